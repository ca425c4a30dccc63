"""`python -m sae_sweep.bench <subcommand> [options]`: subcommand name -> module in this package.

A subcommand module provides `add_arguments(parser)` and `main(args) -> int | None`; register it
by adding its name to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "trainers": "Train every registered trainer on planted-dictionary data and print recovery.",
    "perf": "Throughput figures (the default): cache build, reader, TopK training, sweeps, memory.",
    "readers": "Disk-cache readers (random vs blocks), cold and warm, on a cache the page cache does not hold.",
    "generation": "Faithful generation tokens/s: dataset.generation.sampler=hf against exact_topk_first.",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_sweep.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"sae_sweep.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"sae_sweep.bench.{name}":
                raise
            continue  # a subcommand whose module is not written yet
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["perf", *argv]  # `python -m sae_sweep.bench` (and `make bench`) runs perf
    args = parser.parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
