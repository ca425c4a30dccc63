"""`python -m sae_sweep.export`: the command lives in sae_sweep.cli.export."""

import sys

from sae_sweep.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
