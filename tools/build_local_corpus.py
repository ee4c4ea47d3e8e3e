#!/usr/bin/env python3
"""`megamoe-corpus local` from a checkout (megamoe/cli/corpus.py): the local multi-domain pre-training corpus."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.cli.corpus import local_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
