"""The modules of components/ import each other without a cycle (a cycle forces imports inside
functions and makes the order modules load in matter). Reads the import statements with ast,
those inside functions included; imports nothing. And the stages that do not train import no
Lightning and no MLflow, and the ones that train load torchmetrics without the backends of metrics
archflow never computes (checked in subprocesses).

    .venv/bin/python -m pytest tests/components/test_imports.py -q
"""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "components"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The components modules that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                              # from . import x, from .x import y
                base = "components" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]   # from components import model
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("components.") and n.split(".")[1] in modules}
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the graph, or None (depth-first search)."""
    state, stack = {}, []                       # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_components_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"model", "config"} <= set(graph) and "config" in graph["model"]   # the parse sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "components/ imports in a circle: " + " -> ".join(cycle)


def imported_names(path: Path) -> list[str]:
    """Every module name the file imports (`import a.b`, `from a.b import c`), anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return ([a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
            + [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module])


HEAVY = ("lightning", "mlflow", "transformers", "torch._dynamo")   # seconds of start-up each


def test_stages_that_do_not_train_import_no_lightning_and_no_mlflow():
    """A stage pays only for what it uses: Lightning is the training stages' (and with it
    torchmetrics and torch._dynamo), and MLflow is imported when a run is opened.
    compress imports Lightning only when its method trains (max_steps > 0), inside main()."""
    stages = ["evaluate", "report", "prepare", "validate", "corpus", "export", "hf_import", "compress"]
    code = ("import importlib, sys\n"
            f"for m in {stages!r}:\n"
            "    importlib.import_module('tasks.' + m)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", f"importing the stages {stages} imported {r.stdout.strip()}"


def test_training_stages_load_torchmetrics_without_scipy_signal_or_transformers():
    """torchmetrics, which Lightning imports, would import scipy.signal and transformers (both installed
    here: MLflow brings scipy, the dev extras transformers) for metrics archflow never computes;
    components/lean_torchmetrics.py has it load without them, and leaves lightning_utilities' checks
    as they were, so a Hugging Face import in the same process still finds transformers. That holds
    for every training stage as long as none imports Lightning before components/lit.py does: the
    stages take it only through components.lit (read from their source)."""
    direct = [f"{path.name}: {name}" for path in sorted((PACKAGE.parent / "tasks").glob("*.py"))
              for name in imported_names(path) if name.split(".")[0] in ("lightning", "torchmetrics")]
    assert direct == [], f"import Lightning through components.lit instead: {direct}"
    code = ("import importlib.util, sys\n"
            "import tasks.pretrain, torchmetrics\n"
            "print(','.join(m for m in ('scipy.signal', 'transformers', 'sklearn') if m in sys.modules))\n"
            "from lightning_utilities.core.imports import RequirementCache, package_available\n"
            "assert torchmetrics.Metric and package_available('scipy') and bool(RequirementCache('scipy'))\n"
            "assert bool(RequirementCache('transformers>=4.4.0')) == bool(importlib.util.find_spec('transformers'))\n"
            "import transformers; print(transformers.AutoConfig.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == ["", "AutoConfig"], r.stdout
