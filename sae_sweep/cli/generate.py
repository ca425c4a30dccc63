"""Generate a ``faithful`` dataset ahead of training, in as many shards as you like.

    python -m sae_sweep.generate [--shard I --shards N] [--tokens T] [job overrides]
    sbatch --array=0-15 launchers/generate.sbatch model=smollm2-135m train.tokens=100000000

The overrides are a training job's (``model=...``, ``train.tokens=...``, ``dataset.generation.*``;
``dataset`` defaults to ``faithful``): the stage writes exactly the chunks those jobs read
(``faithful.py``), so a job that starts later finds its text on disk and one that starts earlier
generates what is missing, under the same per-chunk locks. Shard ``I`` of ``N`` writes chunks
``I, I+N, I+2N, ...`` until the chunks hold the budget: ``--tokens`` train-split tokens (default: what
the job's cache needs, ``train.tokens / train.epochs`` + 5 %) and ``dataset.eval_tokens`` of the eval
split. Under SLURM, ``--shard``/``--shards`` default to the array task's id and count. A killed or
requeued shard continues where it stopped; chunks are whole or absent.

Each shard records what it did in ``<chunks dir>/shards/shard-I-of-N.json`` (chunks and tokens it
generated, seconds, tokens/s) and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from omegaconf import DictConfig

log = logging.getLogger("sae_sweep.generate")


def compose_job(overrides: Sequence[str]) -> DictConfig:
    """The job config these overrides describe (``dataset=faithful`` unless another one is named)."""
    from hydra import compose, initialize_config_dir

    from sae_sweep.job.app import CONF_DIR

    picks = list(overrides)
    if not any(o.split("=", 1)[0] == "dataset" for o in picks):
        picks.insert(0, "dataset=faithful")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=picks)


def _array_default(name: str, fallback: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else fallback


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_sweep.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="job overrides: model=..., train.tokens=..., dataset.generation.*")
    parser.add_argument("--shard", type=int, default=None, help="this shard (default: $SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: $SLURM_ARRAY_TASK_COUNT or 1)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="train-split tokens to have on disk (default: what the job's cache needs)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shard = args.shard if args.shard is not None else _array_default("SLURM_ARRAY_TASK_ID", 0)
    shards = args.shards if args.shards is not None else _array_default("SLURM_ARRAY_TASK_COUNT", 1)

    from hydra.errors import HydraException

    from sae_sweep import config as C
    from sae_sweep.data.faithful import generate_shard
    from sae_sweep.data.text import generations
    from sae_sweep.job.app import unknown_key_problems, validate_point
    from sae_sweep.models.lm import load_lm
    from sae_sweep.util.progress import Progress

    problems = unknown_key_problems(args.overrides)
    if shards < 1:
        problems.append(f"--shards={shards}: allowed values are integers >= 1")
    elif not 0 <= shard < shards:
        problems.append(f"--shard={shard}: allowed values are 0 .. {shards - 1} (--shards={shards})")
    if args.tokens is not None and args.tokens < 1:
        problems.append(f"--tokens={args.tokens}: allowed values are integers >= 1")
    try:
        cfg = None if problems else compose_job(args.overrides)
        if cfg is not None and cfg.dataset.kind != "faithful":
            problems.append(
                f"dataset={cfg.dataset.name} is a {cfg.dataset.kind} dataset: only dataset.kind=faithful "
                f"is generated (allowed: a dataset whose kind is faithful, e.g. dataset=faithful)"
            )
        if cfg is not None and not problems:
            validate_point(cfg, check_availability=False)
    except (HydraException, C.ConfigError) as e:
        problems.append(str(e))
    if problems or cfg is None:
        print("sae_sweep.generate: " + "\n".join(problems), file=sys.stderr)
        return 2

    train_tokens = args.tokens if args.tokens is not None else C.cache_tokens(cfg)
    lm = load_lm(cfg.model, C.cache_dir(cfg), cfg.device)
    gens = generations(cfg.dataset, lm, C.cache_dir(cfg))
    log.info(
        "shard %d of %d: %s (%d train + %d eval tokens)",
        shard,
        shards,
        gens.root,
        train_tokens,
        int(cfg.dataset.eval_tokens),
    )
    with Progress(f"generating shard {shard}/{shards}", unit="tok") as bar:
        record = generate_shard(gens, shard, shards, train_tokens, int(cfg.dataset.eval_tokens), progress=bar)
    record.update(
        model=cfg.model.name,
        device=str(lm.device),
        train_tokens=train_tokens,
        eval_tokens=int(cfg.dataset.eval_tokens),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
    )
    from sae_sweep.util.files import atomic_write_json

    atomic_write_json(gens.root / "shards" / f"shard-{shard}-of-{shards}.json", record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
