"""`python -m sae_sweep ...` — the Hydra app lives in sae_sweep.job.app (Hydra names jobs after its module)."""

import signal
import sys

from sae_sweep.job.app import integral_numbers, main, scope_to_swept_groups, unknown_key_problems


def _terminated(signum, frame):
    # Python's default for SIGTERM (kill, timeout, a batch script's scancel) ends the process at once:
    # its MLflow runs stayed RUNNING and its locks waited for a heartbeat timeout. Raised as an exit,
    # it unwinds like Ctrl-C: open runs end KILLED (a rerun continues them), locks are released.
    # Jobs that submitit starts do not come through here: app.PreemptionGuard handles their signals.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.argv[1:] = integral_numbers(sys.argv[1:])
    # A mistyped key gets the allowed keys and the nearest one, before Hydra's terser refusal.
    problems = unknown_key_problems(sys.argv[1:])
    if problems:
        print("sae_sweep: invalid configuration:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = scope_to_swept_groups(sys.argv[1:])
    main()
