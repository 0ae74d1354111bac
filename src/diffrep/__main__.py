"""`python -m diffrep ...`: the same command line as `diffrep` (cli.py)."""
import sys

from diffrep.cli import main

sys.exit(main(sys.argv[1:]))
