#!/usr/bin/env python3
"""`megamoe-preprocess` from a checkout (megamoe/cli/preprocess.py): JSONL -> megatron .bin/.idx datasets."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
