#!/usr/bin/env python3
"""`megamoe-plot` from a checkout (megamoe/cli/plot.py): routing, loss and token-loss plots of a training run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.cli.plot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
