"""`python -m blsgpu ...` is the `blsgpu` command."""

import sys

from blsgpu.cli import main

if __name__ == "__main__":  # the guard matters: run_world's forkserver re-imports __main__
    sys.exit(main())
