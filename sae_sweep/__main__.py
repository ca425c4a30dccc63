"""`python -m sae_sweep ...` — the Hydra app lives in sae_sweep.app (Hydra names jobs after its module)."""

from sae_sweep.app import main

if __name__ == "__main__":
    main()
