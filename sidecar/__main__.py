"""Entry point of ``python -m sidecar``."""

import sys

from sidecar.cli import main

if __name__ == "__main__":
    sys.exit(main())
