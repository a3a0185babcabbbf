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

It also writes models/replicas.yaml, the models of replicate seeds (study.replicas) that dvc.yaml's
*-replica stage groups iterate over: dvc.yaml cannot cross params.yaml's entries with their seeds
itself. DVC reads that file when `dvc repro` starts, before this stage runs, so when params.yaml
changed which replicas exist, the stage rewrites the file and stops the repro (`--stage`): run it
again. `make repro` runs `python -m tasks.validate` first, and the Prefect flow checks params.yaml and
rewrites the file before it plans (flows/pipeline.py, preflight), so neither stops there.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import posixpath
from pathlib import Path

from components.errors import ParamsError, cli
from components.files import write_atomic
from components.params import Int8, Study, format_problems, load_study
from components.tokenizer import hf_files

OK = Path("data/params.ok")
VIEWS = Path("models/dvc.yaml")
REPLICAS = Path("models/replicas.yaml")
HEADER = ("# DVC's views of every model of the study: `dvc plots show` overlays their training curves, and\n"
          "# each model is a DVC artifact (type: model). Written by tasks/validate.py from params.yaml; do not edit.\n")


def views(study: Study) -> str:
    """models/dvc.yaml's text: paths are relative to models/ (branches live in ../branches/). Every model
    but an int8 one (never trained, tasks/compress.py) has a curve.csv; its tokens count from its own stage's start."""
    from ruamel.yaml import YAML

    models = study.models()
    rel = {name: posixpath.relpath(m["dir"], VIEWS.parent.as_posix()) for name, m in models.items()}
    trained = [name for name, m in models.items()
               if not isinstance(study.compress.get(m["entry"]), Int8) and m["stage"] != "import"]
    plot = {"template": "curves", "title": "validation loss vs tokens of each model's own stage", "x": "tokens",
            "y": {f"{rel[name]}/curve.csv": "val_loss" for name in trained}}
    artifacts = {name: {"path": rel[name], "type": "model", "desc": describe(name, m),
                        "labels": labels(study, name, m)} for name, m in models.items()}
    yaml, out = YAML(typ="safe", pure=True), io.StringIO()
    yaml.default_flow_style, yaml.sort_base_mapping_type_on_output, yaml.width = False, False, 4096   # as written
    yaml.dump({"plots": [{"val_loss_vs_tokens": plot}], "artifacts": artifacts}, out)
    return HEADER + out.getvalue()


def replicas(study: Study) -> str:
    """models/replicas.yaml's text: {replica: Study.replica_plan()}, for dvc.yaml's `vars`."""
    from ruamel.yaml import YAML

    yaml, out = YAML(typ="safe", pure=True), io.StringIO()
    yaml.default_flow_style, yaml.sort_base_mapping_type_on_output, yaml.width = False, False, 4096
    yaml.dump({"replica": study.replica_plan()}, out)
    return ("# The models of replicate seeds (study.replicas): <entry>-s<seed> -> its entry, seed and the model it is\n"
            "# made from, for dvc.yaml's *-replica stages. Written by tasks/validate.py from params.yaml; do not edit.\n"
            + out.getvalue())


def describe(name: str, model: dict) -> str:
    made = f"made by dvc stage {model['group']}@{name}"
    return made + (f" from {', '.join(model['parents'])}" if model["parents"] else "")


def labels(study: Study, name: str, model: dict) -> list[str]:
    """[stage, how it was made (preset, domain, init or method), seed:<seed>, parent:<name> for each parent]."""
    stage, entry = model["stage"], model["entry"]
    if stage == "pretrain":
        preset = study.pretrain.variants[entry].preset
        how = [f"preset:{preset}"] if preset else []
    elif stage == "branch":
        how = [f"domain:{study.branch[entry].domain}"]
    elif stage == "import":
        how = [f"source:{study.imports[entry].hf or study.imports[entry].path}"]
    elif stage == "distill":
        how = [f"init:{study.distill[entry].init}"]
    else:                                              # upcycle, compress: one class per method
        how = [f"method:{getattr(study, stage)[entry].method}"]
    seed = [f"seed:{model['seed']}"] if model["seed"] is not None else []
    return [stage, *how, *seed, *(f"parent:{p}" for p in model["parents"])]


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


def extra_problems(study: Study) -> list[str]:
    """The optional packages the study's stages need and this environment lacks, each with the extra that
    brings it (`make repro` installs none: README "Quick start"). Looked up, not imported."""
    needs = [("evaluate.tasks", "lm_eval", "lm-evaluation-harness", "eval", study.evaluate.tasks),
             ("import", "transformers", "transformers", "hf", study.imports)]
    return [f"{key}: needs {package}, which is not installed here: `make repro EXTRAS={extra}` (or "
            f"`pip install -e '.[{extra}]'`) installs it"
            for key, module, package, extra, used in needs if used and importlib.util.find_spec(module) is None]


def check(study: Study) -> None:
    """What must hold before any stage runs besides params.yaml itself (load_study checks that): the
    files it names and the extras its stages need. Raises one ParamsError; the Prefect flow checks it too."""
    if problems := path_problems(study):
        raise ParamsError(format_problems(Path("params.yaml"), problems))
    if missing := extra_problems(study):
        raise ParamsError("params.yaml is valid, but this environment lacks what its stages need; nothing was run:\n"
                          + "\n".join(f"  - {m}" for m in missing))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", action="store_true",
                        help="as dvc.yaml's validate stage: stop when models/replicas.yaml was out of date")
    args = parser.parse_args(argv)
    study = load_study()
    check(study)
    stale = write_atomic(REPLICAS, replicas(study))
    write_atomic(VIEWS, views(study))
    if stale and args.stage:
        raise ParamsError(f"{REPLICAS}, the models of replicate seeds that dvc.yaml reads, was older than params.yaml "
                          f"(study.replicas, or the models made from them); it is rewritten now, but this `dvc repro` "
                          f"planned its stages from the old one: run `dvc repro` again (`make repro` and the Prefect "
                          f"flow run `python -m tasks.validate` first, which avoids this stop)")
    write_atomic(OK, "params.yaml is valid\n")
    n = sum(m["seed"] not in (None, study.study.seed) for m in study.models().values())
    print(f"params.yaml is valid: study '{study.study.name}' with {len(study.models())} models"
          + (f" ({n} of replicate seeds)" if n else ""))


if __name__ == "__main__":
    cli(main)
