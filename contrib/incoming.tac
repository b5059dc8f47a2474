"""Runs Incoming!! under `twistd -ny incoming.tac` (the systemd units).

Settings come from the YAML file named by $INCOMING_CONFIG, if set, and from the
options of `twistd incoming` in $INCOMING_OPTIONS (split as a shell would; they win).
Unlike `twistd incoming`, this never looks for plugins, so it writes no plugin cache.
"""

import os
import shlex

from twisted.application.service import Application
from twisted.python import usage

from incoming.config import Options
from incoming.tap import makeService

arguments = ["--config", os.environ["INCOMING_CONFIG"]] if os.environ.get("INCOMING_CONFIG") else []
options = Options()
try:
    options.parseOptions(arguments + shlex.split(os.environ.get("INCOMING_OPTIONS", "")))
except usage.UsageError as e:
    raise SystemExit(f"incoming: {e}") from None
application = Application("incoming")
makeService(options).setServiceParent(application)
