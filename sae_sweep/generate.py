"""`python -m sae_sweep.generate`: the command lives in sae_sweep.cli.generate."""

import sys

from sae_sweep.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
