"""Data flows one way (ARCHITECTURE.md): a module imports only modules to its left, lazily or not,
and there are no import cycles. A new import that points right fails here with the offending line."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "sae_sweep"

# Left to right: the stage packages in the order data flows through them. A package is one place in
# the order; its modules may import each other (checked for cycles below).
ORDER = [
    "util",
    "config",
    "data",
    "models",
    "activations",
    "sae",
    "training",
    "evals",
    "tracking",
    "report",
    "job",
    "cli",
    "bench",
    "evaluate",
    "export",
    "generate",
    "__main__",  # the `python -m sae_sweep.<tool>` entry points
]


def _unit(module: str) -> str:
    """'sae_sweep.sae.topk' -> 'sae'; 'sae_sweep.activations.cache' -> 'cache'."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def _imports(path: Path, module: str):
    """(line, imported sae_sweep module) for every import in the file, inside functions too."""
    tree = ast.parse(path.read_text())
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sae_sweep."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "sae_sweep":  # `from sae_sweep import config as C`
                for alias in node.names:
                    yield node.lineno, f"sae_sweep.{alias.name}"
            elif target.startswith("sae_sweep."):
                yield node.lineno, target


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_every_module_has_a_place_in_the_order():
    units = {_unit(m) for _, m in _modules() if m != "sae_sweep"}
    assert units <= set(ORDER), f"add {sorted(units - set(ORDER))} to ORDER (and to ARCHITECTURE.md)"


def test_nothing_imports_to_its_right():
    wrong = []
    for path, module in _modules():
        if module == "sae_sweep":
            continue
        here = ORDER.index(_unit(module))
        for line, target in _imports(path, module):
            there = ORDER.index(_unit(target))
            if there > here:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({_unit(module)}) imports {target}")
    assert not wrong, "imports pointing right:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {}
    for path, module in _modules():
        graph.setdefault(module, set()).update(t for _, t in _imports(path, module) if t != module)
    known = set(graph)

    def resolve(target):  # `from sae_sweep.evals.core import x` -> the module it names
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted({resolve(t) for t in graph.get(node, ())}):
            # a package's __init__ importing its own modules (the registries) is not a cycle of modules
            if nxt == node or (node.startswith(nxt + ".") and nxt.count(".") == 1):
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_tracking_imports_mlflow_and_only_app_and_plugins_touch_submitit():
    for path, module in _modules():
        text = path.read_text()
        if _unit(module) != "tracking":
            assert "import mlflow" not in text and "from mlflow" not in text, module
        assert "import submitit" not in text, module  # launch concerns live in hydra_plugins/
