#!/usr/bin/env python3
"""`megamoe-corpus chat` from a checkout (megamoe/cli/corpus.py): the embedded chat corpus for SFT."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamoe.cli.corpus import chat_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
