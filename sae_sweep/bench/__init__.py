"""Benchmark commands (`python -m sae_sweep.bench <subcommand>`): they print figures, they are not tests.

Each subcommand is a module in this package with `add_arguments(parser)` and `main(args)`;
`__main__` maps the subcommand name to that module.
"""
