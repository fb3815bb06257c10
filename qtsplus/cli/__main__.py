"""`python -m qtsplus.cli ...` is `qtsplus ...`."""

import sys

from qtsplus.cli import main

if __name__ == "__main__":
    sys.exit(main())
