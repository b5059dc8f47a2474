"""Runs Incoming!! under `twistd -ny incoming.tac` (the systemd service).

Settings come from the YAML file named by $INCOMING_CONFIG, if set.
"""

import os

from twisted.application.service import Application
from twisted.internet import reactor

from incoming.config import Options
from incoming.service import make_service
from incoming.tap import tune_process

options = Options()
options.parseOptions(["--config", os.environ["INCOMING_CONFIG"]] if "INCOMING_CONFIG" in os.environ else [])
application = Application("incoming")
make_service(options.config).setServiceParent(application)
tune_process(reactor)
