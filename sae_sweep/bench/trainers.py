"""Known-answer harness: train every registered trainer on planted-dictionary data.

Data: `PlantedDictionary(d, n_features)` (more features than dimensions, sparse non-negative
codes, correlated groups, noise). Each trainer gets a recipe (its `trainer.*` overrides, k, steps);
after training, the decoder is scored against the true dictionary (mean max cosine, fraction
recovered above 0.9) and the SAE on held-out samples (explained variance, L0, dead fraction).

    python -m sae_sweep.bench trainers [--only relu,topk] [--mode published] [--out table.json]
    python -m sae_sweep.bench trainers --corrections [--only hierarchical]

also prints temporal_ortho's co-activation tracking memory at d_sae 65536 (see `memory_figure`).
`tests/test_trainers.py` pins a floor per trainer on the same recipes.

`--mode published` runs the research trainers (those with `trainer.mode`) as their write-ups
published them (`published_recipe`: the recipe without its correction keys). `--corrections`
measures each correction on its own: for every research trainer, the corrected recipe with each
correction reverted to its published value, and the published recipe with each one applied (the
figures quoted in the trainers' docstrings and docs/research-variants.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_sweep.activations.synthetic import PlantedDictionary
from sae_sweep.evals.recovery import recovery_metrics
from sae_sweep.sae import SparseAutoencoder, get_trainer, trainer_names
from sae_sweep.sae.trainer import explained_variance


@dataclass
class PlantedSetup:
    """The planted-dictionary problem every trainer is scored on (small: ~seconds per trainer)."""

    d: int = 32
    n_features: int = 64
    l0: float = 3.0
    correlated_groups: int = 8
    correlation: float = 0.3
    noise: float = 0.01
    d_sae: int = 128
    batch_size: int = 256
    pool: int = 1 << 16  # training samples, drawn with replacement
    eval_samples: int = 8192
    data_seed: int = 0


@dataclass
class Recipe:
    """How one trainer is run on the planted problem: `sae.k`, steps and `trainer.*` overrides."""

    k: int = 4
    steps: int = 600
    lr: float = 5e-3
    overrides: dict[str, Any] = field(default_factory=dict)


# Per-trainer settings. Sparsity coefficients are in units of this data (||x||^2 ~ l0); k = 4 ~ l0.
RECIPES: dict[str, Recipe] = {
    "topk": Recipe(),
    "batchtopk": Recipe(),
    "relu": Recipe(overrides={"l1_coeff": 0.3, "l1_warmup": 0.1}),
    # thresholds start near the scale of this data's pre-activations (the default 0.1 is generic)
    "jumprelu": Recipe(overrides={"target_l0": 4.0, "bandwidth": 0.05, "threshold_init": 0.1}),
    # smallest prefix = n_features: the nested loss then asks the first half to hold every feature
    "matryoshka": Recipe(overrides={"n_prefixes": 2}),
    # 1/sqrt(d_sae) = 0.09 is too weak for this data's scale; stop the decay at half
    "hierarchical": Recipe(overrides={"l1_start": 0.5, "l1_end_frac": 0.5, "target_fvu": 0.05}),
    "temporal_ortho": Recipe(),
    "adaptive_ortho": Recipe(overrides={"group_size": 64}),
}


def corrections(name: str) -> dict[str, Any]:
    """The trainer's `trainer.mode` corrections table ({} for a trainer without modes)."""
    import importlib

    return getattr(importlib.import_module(get_trainer(name).__module__), "CORRECTIONS", {})


def published_recipe(name: str) -> Recipe:
    """The trainer's recipe in `trainer.mode=published`: its plain keys (e.g. hierarchical's
    `l1_start`, set for this data's scale) kept, its correction keys left to the mode."""
    recipe = RECIPES.get(name, Recipe())
    table = corrections(name)
    overrides = {k: v for k, v in recipe.overrides.items() if k not in table}
    return dataclasses.replace(recipe, overrides={**overrides, "mode": "published"})


def correction_rows(name: str, setup: PlantedSetup, data: tuple, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each correction measured alone: the corrected recipe with it reverted, the published recipe
    with it applied."""
    table = corrections(name)
    base = RECIPES.get(name, Recipe())
    pub = published_recipe(name)
    runs = {"corrected": base}
    for key, c in table.items():
        runs[f"corrected, {key}={c.published}"] = dataclasses.replace(
            base, overrides={**base.overrides, key: c.published}
        )
    runs["published"] = pub
    for key, c in table.items():
        runs[f"published, {key}={c.corrected}"] = dataclasses.replace(
            pub, overrides={**pub.overrides, key: c.corrected}
        )
    return {label: train_planted(name, recipe, setup, seed=seed, data=data)[1] for label, recipe in runs.items()}


def trainer_cfg(name: str, recipe: Recipe, setup: PlantedSetup) -> dict[str, Any]:
    """Defaults of the trainer's params dataclass + the recipe's overrides."""
    cls = get_trainer(name)
    cfg = {f.name: f.default for f in dataclasses.fields(cls.params_cls)}
    cfg.update(
        name=name, lr=recipe.lr, batch_size=setup.batch_size, warmup_steps=20, dead_tokens=setup.batch_size * 100
    )
    cfg.update(recipe.overrides)
    return cfg


def planted_data(setup: PlantedSetup) -> tuple[PlantedDictionary, torch.Tensor, torch.Tensor]:
    pd = PlantedDictionary(setup.d, setup.n_features, seed=setup.data_seed)
    kw: dict[str, Any] = dict(
        l0=setup.l0, correlated_groups=setup.correlated_groups, correlation=setup.correlation, noise=setup.noise
    )
    train = pd.sample(setup.pool, **kw)
    held_out = pd.sample(setup.eval_samples, **kw)
    return pd, train, held_out


@torch.no_grad()
def score(sae: SparseAutoencoder, pd: PlantedDictionary, x: torch.Tensor) -> dict[str, float]:
    """Recovery of the planted dictionary + reconstruction/sparsity on held-out samples (eval mode)."""
    sae.eval()
    x_hat, f = sae(x)
    out = recovery_metrics(sae.W_dec, pd, thresholds=(0.9,))
    out.update(
        explained_variance=float(explained_variance(x, x_hat)),
        l0=float((f > 0).float().sum(-1).mean()),
        dead_frac=float((~(f > 0).any(0)).float().mean()),
    )
    sae.train()
    return out


def train_planted(
    name: str, recipe: Recipe | None = None, setup: PlantedSetup | None = None, seed: int = 0, data: tuple | None = None
) -> tuple[Any, dict[str, float]]:
    """Train `name` on the planted problem; returns (trainer, metrics incl. seconds)."""
    setup = setup or PlantedSetup()
    recipe = recipe or RECIPES.get(name, Recipe())
    pd, train, held_out = data if data is not None else planted_data(setup)
    cls = get_trainer(name)
    trainer = cls(
        setup.d, {"d_sae": setup.d_sae, "k": recipe.k}, trainer_cfg(name, recipe, setup), recipe.steps, seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    trainer.init_from_data(train[:4096])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are tiny: extra threads only add sync overhead
    try:
        t0 = time.perf_counter()
        for _ in range(recipe.steps):
            idx = torch.randint(0, train.shape[0], (setup.batch_size,), generator=gen)
            metrics = trainer.step(train[idx])
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    out = score(trainer.sae, pd, held_out)
    out["train_loss"] = float(metrics["loss"])
    out["seconds"] = seconds
    return trainer, out


COLUMNS = ("mean_max_cos", "frac_recovered_0.9", "explained_variance", "l0", "dead_frac", "seconds")


def format_table(rows: dict[str, dict[str, float]], width: int = 16) -> str:
    head = f"{'trainer':<{width}}" + "".join(f"{c:>20}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[c]:>20.3f}" for c in COLUMNS))
    return "\n".join(lines)


def memory_figure(d_sae: int = 65536, **kw: Any) -> dict[str, Any]:
    """temporal_ortho's co-activation tracking memory at `d_sae` (`temporal_ortho.measure_memory`),
    measured in a fresh process so the peak RSS is not the harness's own training peak."""
    code = (
        "import json, sys; from sae_sweep.sae.temporal_ortho import measure_memory; "
        "print(json.dumps(measure_memory(**json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps({"d_sae": d_sae, **kw})], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default="", help="comma-separated trainer names (default: all registered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the table (and memory figure) as JSON here")
    p.add_argument("--no-memory", action="store_true", help="skip the temporal_ortho memory figure")
    p.add_argument("--memory-d-sae", type=int, default=65536)
    p.add_argument(
        "--mode",
        choices=("corrected", "published"),
        default="corrected",
        help="trainer.mode of the research trainers (others have none)",
    )
    p.add_argument(
        "--temporal-routes",
        action="store_true",
        help="only time temporal_ortho's two co-activation routes (pairs vs gram) at a few shapes",
    )
    p.add_argument(
        "--corrections",
        action="store_true",
        help="measure each research trainer's corrections one at a time (see the module docstring)",
    )


def routes_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'batch':>6} {'k':>4} {'d_sae':>6} {'setup':<10} {'pairs ms':>9} {'gram ms':>9} {'auto':>6} {'auto vs other':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mine, other = (r["gram_s"], r["pairs_s"]) if r["auto"] == "gram" else (r["pairs_s"], r["gram_s"])
        lines.append(
            f"{r['batch']:>6} {r['k']:>4} {r['d_sae']:>6} {r['setup']:<10} {r['pairs_s'] * 1e3:>9.0f} "
            f"{r['gram_s'] * 1e3:>9.0f} {r['auto']:>6} {other / mine:>13.2f}x"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.temporal_routes:
        from sae_sweep.sae.temporal_ortho import measure_routes

        route_rows = measure_routes()
        print(
            "temporal_ortho: observe + weights + penalty + backward per step, best of 3 "
            "(auto: the route `prefers_gram` picks; 'auto vs other': how much faster it is)"
        )
        print(routes_table(route_rows))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"temporal_routes": route_rows}, fh, indent=2)
            print(f"wrote {args.out}")
        return 0
    names = [n for n in args.only.split(",") if n] or trainer_names()
    setup = PlantedSetup()
    data = planted_data(setup)
    print(
        f"planted dictionary: d={setup.d}, n_features={setup.n_features}, l0={setup.l0}, "
        f"groups={setup.correlated_groups}, noise={setup.noise}; d_sae={setup.d_sae}"
    )
    if args.corrections:
        result: dict[str, Any] = {"setup": dataclasses.asdict(setup), "corrections": {}}
        for name in (n for n in names if corrections(n)):
            rows = correction_rows(name, setup, data, seed=args.seed)
            result["corrections"][name] = rows
            print(f"\n{name}\n" + format_table(rows, width=44), flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
            print(f"wrote {args.out}")
        return 0
    rows = {}
    for name in names:
        recipe = published_recipe(name) if args.mode == "published" and corrections(name) else None
        _, rows[name] = train_planted(name, recipe=recipe, setup=setup, seed=args.seed, data=data)
        print(f"  {name}: done in {rows[name]['seconds']:.1f}s", flush=True)
    print(format_table(rows))
    result = {"setup": dataclasses.asdict(setup), "mode": args.mode, "trainers": rows}
    if not args.no_memory and "temporal_ortho" in trainer_names():
        mem = memory_figure(d_sae=args.memory_d_sae)
        result["temporal_ortho_memory"] = mem
        print(f"\ntemporal_ortho co-activation tracking at d_sae={mem['d_sae']} (cap={mem['cap']} pairs/latent):")
        for key, value in mem.items():
            print(f"  {key:<32} {value:,.1f}" if isinstance(value, float) else f"  {key:<32} {value:,}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")
    return 0
