"""validate: check all of params.yaml, before any other stage runs, and write models/dvc.yaml.

    python -m tasks.validate                # what `dvc repro validate` runs; exits 2 listing every problem

DVC tracks params.yaml as a whole file here, so a typo in any section (even one no stage
tracks) reruns this stage and stops `dvc repro` before any compute. On success it writes
data/params.ok, whose content never changes, so passing validation triggers nothing downstream.

It also writes models/dvc.yaml, DVC's views of the study's models: one plot overlaying every
model's curve.csv (`dvc plots show`) and one artifact per model (`type: model`, with its stage,
parents and method as labels). dvc.yaml's top-level `plots:` and `artifacts:` cannot `foreach`
over params.yaml, so this file lists the models one by one; DVC refuses a dvc.yaml as a stage
output, so it is written here as a side effect, only when its content changes, and committed to
git like dvc.lock (tests/tasks/test_validate.py checks the committed one is current).
"""
from __future__ import annotations

import argparse
import io
import posixpath
from pathlib import Path

from components.errors import ParamsError, cli
from components.files import write_atomic
from components.params import Int8, Study, format_problems, load_study
from components.tokenizer import hf_files

OK = Path("data/params.ok")
VIEWS = Path("models/dvc.yaml")
HEADER = ("# DVC's views of every model of the study: `dvc plots show` overlays their training curves, and\n"
          "# each model is a DVC artifact (type: model). Written by tasks/validate.py from params.yaml; do not edit.\n")


def views(study: Study) -> str:
    """models/dvc.yaml's text: paths are relative to models/ (branches live in ../branches/). Every model
    but an int8 one (never trained, tasks/compress.py) has a curve.csv; its tokens count from its own stage's start."""
    from ruamel.yaml import YAML

    models = study.models()
    rel = {name: posixpath.relpath(m["dir"], VIEWS.parent.as_posix()) for name, m in models.items()}
    trained = [name for name in models if not isinstance(study.compress.get(name), Int8) and name not in study.imports]
    plot = {"template": "curves", "title": "validation loss vs tokens of each model's own stage", "x": "tokens",
            "y": {f"{rel[name]}/curve.csv": "val_loss" for name in trained}}
    artifacts = {name: {"path": rel[name], "type": "model", "desc": describe(name, m),
                        "labels": labels(study, name, m)} for name, m in models.items()}
    yaml, out = YAML(typ="safe", pure=True), io.StringIO()
    yaml.default_flow_style, yaml.sort_base_mapping_type_on_output, yaml.width = False, False, 4096   # as written
    yaml.dump({"plots": [{"val_loss_vs_tokens": plot}], "artifacts": artifacts}, out)
    return HEADER + out.getvalue()


def describe(name: str, model: dict) -> str:
    made = f"made by dvc stage {model['stage']}@{name}"
    return made + (f" from {', '.join(model['parents'])}" if model["parents"] else "")


def labels(study: Study, name: str, model: dict) -> list[str]:
    """[stage, how it was made (preset, domain, init or method), parent:<name> for each parent]."""
    stage = model["stage"]
    if stage == "pretrain":
        preset = study.pretrain.variants[name].preset
        how = [f"preset:{preset}"] if preset else []
    elif stage == "branch":
        how = [f"domain:{study.branch[name].domain}"]
    elif stage == "import":
        how = [f"source:{study.imports[name].hf or study.imports[name].path}"]
    elif stage == "distill":
        how = [f"init:{study.distill[name].init}"]
    else:                                              # upcycle, compress: one class per method
        how = [f"method:{getattr(study, stage)[name].method}"]
    return [stage, *how, *(f"parent:{p}" for p in model["parents"])]


def path_problems(study: Study) -> list[str]:
    """The local files params.yaml names that must exist before any stage runs (load_study checks
    only params.yaml itself): import paths and data.hf_tokenizer, each with how to get it."""
    p = [problem for name, entry in study.imports.items() if (problem := entry.missing(name))]
    if study.data.tokenizer == "hf" and study.data.hf_tokenizer:
        try:
            hf_files(study.data.hf_tokenizer)
        except FileNotFoundError as e:
            p.append(f"data.hf_tokenizer: {e}")
    return p


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    study = load_study()
    if problems := path_problems(study):
        raise ParamsError(format_problems(Path("params.yaml"), problems))
    write_atomic(VIEWS, views(study))
    write_atomic(OK, "params.yaml is valid\n")
    print(f"params.yaml is valid: study '{study.study.name}' with {len(study.models())} models")


if __name__ == "__main__":
    cli(main)
