"""Shared test helpers: the CLI runner, MLflow store access, config builders, local model
directories, a known-values sweep, and small process and reader utilities.

Test files import them as ``from helpers.<module> import ...`` (pytest puts tests/ on sys.path).
Nothing here is imported by the jobs the tests start: they run with the installed package only.
"""
