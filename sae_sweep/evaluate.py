"""`python -m sae_sweep.evaluate`: the command lives in sae_sweep.cli.evaluate."""

import sys

from sae_sweep.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
