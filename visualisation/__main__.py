"""``python -m visualisation``: see visualisation/cli.py."""

import sys

from visualisation.cli import main

if __name__ == "__main__":
    sys.exit(main())
