"""Command-line tools beside the Hydra app: evaluate, export, generate."""
