"""dvc.yaml's code deps of each stage are exactly the project modules its command imports.

    .venv/bin/python -m pytest tests/test_dvc_deps.py -q

A stage whose deps miss a module it imports serves stale results when that module changes; one that
lists a module it does not import reruns for nothing. The import closure is read from the source
(ast, every import statement, also those inside functions), so the check needs nothing installed.
"""
import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "tasks")
# MLflow mirroring writes no DVC output, and lean_torchmetrics decides only what torchmetrics loads
# at start-up: editing either must not rerun the study (nor is what they import followed).
NOT_DEPS = {Path("components/tracking.py"), Path("components/lean_torchmetrics.py")}


def imported_modules(path: Path) -> set[Path]:
    """Project modules (relative paths) that the file at `path` imports directly."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                module = Path(*name.split(".")).with_suffix(".py")
                if (ROOT / module).exists():
                    found.add(module)
    return found


def import_closure(module: Path) -> set[Path]:
    """`module` and every project module it reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen and m not in NOT_DEPS:
            seen.add(m)
            todo.extend(imported_modules(ROOT / m))
    return seen


def stage_definitions(dvc_yaml: dict) -> dict[str, dict]:
    """name -> stage definition; a foreach group's `do` template stands for all its entries."""
    return {name: stage.get("do", stage) for name, stage in dvc_yaml["stages"].items()}


def code_dep_problems(dvc_yaml: dict) -> list[str]:
    problems = []
    for name, stage in stage_definitions(dvc_yaml).items():
        words = stage["cmd"].split()
        entry = Path(*words[words.index("-m") + 1].split(".")).with_suffix(".py")
        needed = {str(m) for m in import_closure(entry)}
        listed = {d for d in stage.get("deps", []) if d.endswith(".py")}
        problems += [f"stage '{name}' imports {m} but dvc.yaml does not list it in deps" for m in sorted(needed - listed)]
        problems += [f"stage '{name}' lists {m} in deps but never imports it" for m in sorted(listed - needed)]
    return problems


def test_every_stage_depends_on_exactly_the_code_it_imports():
    problems = code_dep_problems(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert not problems, "fix dvc.yaml:\n" + "\n".join(problems)


def test_a_removed_or_extra_dep_is_named():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    before = code_dep_problems(dvc_yaml)
    deps = dvc_yaml["stages"]["prepare"]["deps"]
    deps.remove("tasks/prepare.py")
    deps.append("components/quant.py")
    assert [p for p in code_dep_problems(dvc_yaml) if p not in before] == [
        "stage 'prepare' imports tasks/prepare.py but dvc.yaml does not list it in deps",
        "stage 'prepare' lists components/quant.py in deps but never imports it"]
