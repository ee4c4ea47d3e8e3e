#!/usr/bin/env python3
"""`megamoe-convert` from a checkout. The converter, its flags and docs live in megamoe/cli/convert.py."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.cli.convert import main  # noqa: E402
if __name__ == "__main__": sys.exit(main())  # noqa: E701
