"""`python -m sae_sweep ...` — the Hydra app lives in sae_sweep.app (Hydra names jobs after its module)."""

import sys

from sae_sweep.app import main, unknown_key_problems

if __name__ == "__main__":
    # A mistyped key gets the allowed keys and the nearest one, before Hydra's terser refusal.
    problems = unknown_key_problems(sys.argv[1:])
    if problems:
        print("sae_sweep: invalid configuration:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    main()
