"""Where the files an operator installs beside the package are: the systemd units, the
.tac file they run and an example YAML file (docs/deployment/install.rst).

`python -m incoming.contrib` prints their directory, `python -m incoming.contrib NAME`
the path of one of them (for example `systemd/incoming.service`).
"""

from __future__ import annotations

import sys
from pathlib import Path

FILES = ("incoming.tac", "incoming.yaml", "systemd/incoming.service", "systemd/incoming@.service")


def contrib_dir() -> Path:
    """`incoming/contrib` once installed, `contrib/` in a source checkout."""
    here = Path(__file__).parent
    installed = here / "contrib"
    return installed if installed.is_dir() else here.parent / "contrib"


def main(argv: list[str]) -> int:
    if not argv:
        print(contrib_dir())
        return 0
    if len(argv) > 1 or argv[0] not in FILES:
        print(f"usage: python -m incoming.contrib [{' | '.join(FILES)}]", file=sys.stderr)
        return 2
    print(contrib_dir() / argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
