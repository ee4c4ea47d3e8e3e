"""The command-line interfaces: argument parsing and what the commands print; the work itself lives in the
library packages they call.

| module | job |
|---|---|
| `exit.py` | how a command ends: one line and the documented exit status (megamoe/errors.py), no traceback for input or output problems |
| `args.py` | argparse types shared by every command (positive integers, index lists, ...): a bad value is an argparse error naming the flag, exit 2 |
"""
