"""`python -m wmfast.cli ...`: the same as the `wmfast` command."""
import sys

from wmfast.cli import main

sys.exit(main())
