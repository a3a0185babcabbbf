"""End to end: `dvc repro` of the smoke study in a temporary git + DVC copy of the project.

    .venv/bin/python -m pytest tests/test_pipeline.py -q        # a few minutes; CI runs it
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dvc.repo import Repo

from components.params import load_study
from components.tokenizer import Tokenizer
from tasks import validate
from tasks.evaluate import NOT_MEASURED

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load_study(ROOT / "tests/smoke/params.yaml")
MODELS = SMOKE.models()                        # every model, branches included: name -> stage, parents, dir
NAMES = SMOKE.evaluated()                      # the ones with metrics/<name>.json


def stage_of(name: str) -> str:
    """The DVC stage that makes a model, and the one that evaluates it."""
    return SMOKE.stage_of(name)


def evaluate_stage(name: str) -> str:
    group = MODELS[name]["group"]
    return (f"evaluate@{name}" if group == "pretrain" else "evaluate-replica@" + name if group.endswith("-replica")
            else f"evaluate-{group}@{name}")
QUALITY = ["val_loss", "val_ppl", "val_bpb", "params", "active_params", "size_bytes", "train_tokens"]
CONTRACT = QUALITY + ["prefill_tokens_per_s", "decode_tokens_per_s", "decode_batch_tokens_per_s", "kv_cache_bytes_per_token",
                      "state_bytes_per_sequence", "device", "threads"]
TRAIN_CONTRACT = ["train_seconds", "tokens_per_s", "device", "world_size", "precision", "threads"]  # metrics/train/


def sh(repo, *cmd, check=True):
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=os.environ)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def locked_md5s(repo) -> dict[tuple[str, str], str]:
    """The hash dvc.lock records for each (stage, output path) (a model's decides whether the stages
    downstream of it rerun). The smoke study's dvc.lock is ~180 kB: libyaml reads it in 0.05 s, PyYAML's
    pure-Python loader in 0.35 s."""
    stages = yaml.load((repo / "dvc.lock").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["stages"]
    return {(name, o["path"]): o["md5"] for name, stage in stages.items() for o in stage.get("outs", [])}


def make_repo(repo: Path, params: str) -> Path:
    """The project's files (as git sees them) in `repo`, with `params` as params.yaml, committed
    to a fresh git repo. Stages find this interpreter's `python` first on PATH (set by the caller)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(params)
    (repo / validate.REPLICAS).write_text(validate.replicas(load_study(repo / "params.yaml")))   # as make repro does
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The smoke study in a fresh git + DVC copy of the project, tracking into <repo>/mlflow.db."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # stages' `python`
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)            # the default: <project>/mlflow.db
    yield make_repo(tmp_path_factory.mktemp("study"), (ROOT / "tests/smoke/params.yaml").read_text())
    mp.undo()


@pytest.fixture(scope="module")
def built(repo):
    r = sh(repo, "dvc", "repro")
    return r.stdout


@pytest.mark.slow
def test_repro_builds_every_model_metric_and_report(repo, built):
    for name, info in MODELS.items():
        assert f"Running stage '{stage_of(name)}'" in built
        assert {"model.safetensors", "config.json", "meta.json"} <= {p.name for p in (repo / info["dir"]).iterdir()}
        meta = json.loads((repo / info["dir"] / "meta.json").read_text())
        assert (meta["stage"], meta["parents"], meta.get("seed")) == (info["stage"], info["parents"], info["seed"])
        timing = json.loads((repo / "metrics/train" / f"{name}.json").read_text())
        assert set(TRAIN_CONTRACT) <= set(timing) and (timing["train_seconds"] > 0) == (meta["steps"] > 0)
    for name in NAMES:
        assert f"Running stage '{evaluate_stage(name)}'" in built
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert set(CONTRACT) <= set(metrics) and metrics["val_loss"] > 0 and metrics["threads"] >= 1
    summary = pd.read_csv(repo / "reports/summary.csv", index_col="model")
    assert list(summary.index) == NAMES
    assert summary.loc["parallel", "val_loss"] == json.loads((repo / "metrics/parallel.json").read_text())["val_loss"]
    comparisons = pd.read_csv(repo / "reports/comparisons.csv")
    assert list(comparisons["model"]) == [a for a, _ in SMOKE.report.comparisons]
    assert comparisons["d_val_loss"].iloc[0] == pytest.approx(
        summary.loc["parallel", "val_loss"] - summary.loc["serial", "val_loss"])
    for png in ("val_loss_vs_tokens.png", "ppl_vs_decode_speed.png"):
        assert (repo / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| parallel-gqa" in (repo / "reports/summary.md").read_text()


@pytest.mark.slow
def test_every_model_has_one_current_mlflow_run_per_stage_mirroring_its_files(repo, built):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["archflow-smoke"], filter_string="tags.current = 'true'",
                              output_format="list")
    stages = sorted((r.data.tags["stage"], r.data.tags.get("model", "")) for r in runs)
    assert stages == sorted([("prepare", ""), ("report", "")] + [(m["stage"], n) for n, m in MODELS.items()]
                            + [("evaluate", n) for n in NAMES])
    for run in runs:
        name = run.data.tags.get("model")
        if name:
            assert run.data.tags["parents"] == ",".join(MODELS[name]["parents"])
            assert len(run.data.params) >= 5 and run.data.params["model.n_embd"]
        if run.data.tags["stage"] == "evaluate":
            metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
            assert run.data.metrics == pytest.approx({k: v for k, v in metrics.items() if k not in NOT_MEASURED}, rel=1e-12)
            assert run.data.tags["device"] == metrics["device"]
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain" and r.data.tags["model"] == "serial")
    assert pretrain.data.params["model.block"] == "serial"
    assert len(mlflow.MlflowClient().get_metric_history(pretrain.info.run_id, "val_loss")) == 4
    report = next(r for r in runs if r.data.tags["stage"] == "report")
    table = mlflow.MlflowClient().load_table(report.info.experiment_id, "summary.json", [report.info.run_id])
    assert sorted(table["model"]) == sorted(NAMES)


@pytest.mark.slow
def test_second_repro_is_a_no_op(repo, built):
    """Nothing reruns but the corpus check, and nothing is rewritten (how fast that is: a benchmark, not a test)."""
    lock = (repo / "dvc.lock").read_bytes()
    written = {p: p.stat().st_mtime_ns for d in ("data/prepared", "models", "metrics", "reports")
               for p in (repo / d).rglob("*")}
    out = sh(repo, "dvc", "repro").stdout
    assert re.findall(r"Running stage '([^']+)'", out) == ["corpus"]   # always_changed, finds the corpus unchanged
    assert (repo / "dvc.lock").read_bytes() == lock
    assert {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.slow
def test_bad_params_stop_repro_before_any_compute(repo, built):
    params = (repo / "params.yaml").read_text()
    before = {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")}
    try:
        (repo / "params.yaml").write_text(params + "bogus_key: 1\n")
        r = sh(repo, "dvc", "repro", check=False)
        assert r.returncode != 0 and "bogus_key: unknown key" in r.stderr + r.stdout
        (repo / "params.yaml").write_text(params.replace("n_head: 4", 'n_head: "4"'))
        r = sh(repo, "dvc", "repro", check=False)
        assert r.returncode != 0 and "model.n_head" in r.stderr + r.stdout
        assert "Running stage 'pretrain" not in r.stdout
    finally:
        (repo / "params.yaml").write_text(params)
    assert before == {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")}


@pytest.mark.slow
def test_plots_show_without_targets_overlays_every_curve_and_the_report_figures(repo, built):
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors")
    [curves] = shown["data"]["val_loss_vs_tokens"]
    points = pd.DataFrame(curves["content"]["data"]["values"])
    trained = {n: m for n, m in MODELS.items() if m["stage"] != "import" and "int8" not in n}   # no curve:
                                                                                    # imported, int8 (never trained)
    assert points.groupby("filename").size().to_dict() == {
        f"{m['dir']}/curve.csv": len(pd.read_csv(repo / m["dir"] / "curve.csv")) for m in trained.values()}
    for png in ("val_loss_vs_tokens.png", "ppl_vs_decode_speed.png"):
        assert [p["type"] for p in shown["data"][f"reports/{png}"]] == ["image"]


@pytest.mark.slow
def test_every_model_is_a_dvc_artifact_labelled_with_its_lineage(repo, built):
    with Repo(str(repo)) as dvc_repo:
        artifacts = dvc_repo.artifacts.read()["models/dvc.yaml"]
    assert list(artifacts) == list(MODELS)
    for name, artifact in artifacts.items():
        info = MODELS[name]
        assert (repo / "models" / artifact.path).resolve() == (repo / info["dir"]).resolve()
        assert (artifact.type, artifact.labels[0]) == ("model", info["stage"])
        assert [label for label in artifact.labels if label.startswith("parent:")] == \
            [f"parent:{p}" for p in info["parents"]]
    assert artifacts["parallel-btx"].labels[1] == "method:btx"


@pytest.mark.slow
def test_every_mappable_model_exports_to_transformers_with_the_same_logits(repo, built, tmp_path):
    """The imported checkpoints and every model of a design Hugging Face has (trained here or derived
    from an import) export with the study's tokenizer and load in transformers with no custom code;
    the rest are refused by name."""
    transformers = pytest.importorskip("transformers")
    from components.artifacts import load_model_dir
    from components.errors import ParamsError
    from tasks import export
    prepared = repo / "data/prepared"
    window = torch.from_numpy(np.fromfile(prepared / "val.bin", dtype=np.uint16)[:64].astype(np.int64))[None]
    exported, refused = [], []
    for name in NAMES:
        try:
            export.main([str(repo / MODELS[name]["dir"]), str(tmp_path / name), "--tokenizer", str(prepared / "tokenizer.json")])
        except ParamsError as e:
            assert "no Hugging Face equivalent" in str(e) or "no Hugging Face family expresses" in str(e)
            refused.append(name)
            continue
        exported.append(name)
        model, _ = load_model_dir(repo / MODELS[name]["dir"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True).eval()
        with torch.no_grad():
            assert (model.eval()(window) - hf(window).logits).abs().max().item() <= 1e-4, name
    # the smoke study's parallel blocks use rmsnorm and swiglu, which GPT-NeoX and Falcon have not
    assert exported == ["serial", "serial-s2", "llama", "pythia", "falcon", "serial-kd", "llama-kd", "serial-int8",
                        "serial-int8-s2", "serial-kd-control", "llama-int8"]
    assert refused == ["parallel", "parallel-s2", "parallel-gqa", "parallel-2norm", "par", "one-wide-ffn", "denseformer", "looped",
                       "hybrid", "parallel-continue", "parallel-sparse", "parallel-btx", "parallel-bam", "llama-sparse",
                       "serial-prune", "serial-noattn", "serial-fused", "serial-blocks"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    text = "def f(x):\n    return x ** 2  # sympy"
    assert tokenizer(text)["input_ids"] == Tokenizer.load(prepared / "tokenizer.json").encode(text)


@pytest.mark.slow
def test_lm_eval_runs_the_shipped_local_task_on_smoke_models(repo, built, tmp_path):
    """lm-eval's command line with `archflow` registered, on an upcycled import (an MoE: no Hugging Face
    class loads it), with the study's own (hf) tokenizer, the default data/prepared/tokenizer.json. (The
    other architectures' scores against direct log-probs: tests/components/test_harness.py, in process.)"""
    pytest.importorskip("lm_eval")
    r = sh(repo, sys.executable, "-m", "components.harness", "--model", "archflow", "--model_args",
           f"path={MODELS['llama-sparse']['dir']}", "--tasks", "archflow_tiny_mc", "--include_path", "tests/data/lm_eval",
           "--limit", "4", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out"))
    [result] = (tmp_path / "out").rglob("results_*.json")
    assert 0 <= json.loads(result.read_text())["results"]["archflow_tiny_mc"]["acc,none"] <= 1
    assert "|acc" in r.stdout


@pytest.mark.slow
def test_a_clone_pulled_from_a_remote_reproduces_nothing(repo, built, tmp_path):
    """README's remote example: commit, push to a local remote, clone, pull; `dvc repro` there runs
    at most the always_changed stages, and leaves DVC and git clean."""
    sh(repo, "dvc", "repro")                                   # up to date before committing (here a no-op)
    sh(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    sh(repo, "git", "add", ".dvc/config", "dvc.lock", "data/params.ok", "models/dvc.yaml", "metrics", "reports")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study results")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    always = {name for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items()
              if stage.get("always_changed")}
    assert set(re.findall(r"Running stage '([^']+)'", sh(clone, "dvc", "repro").stdout)) <= always
    assert set(json.loads(sh(clone, "dvc", "status", "--json").stdout)) <= always
    assert sh(clone, "git", "status", "--porcelain").stdout == ""


@pytest.mark.slow
def test_forced_repro_is_byte_identical(repo, built):
    """Forced, alone (--single-item): one model stage of each kind (pretrain, import, upcycle, distill,
    compress) and the evaluation of the first. Every file of every model directory is the same, so
    dvc.lock keeps their hashes: nothing downstream is invalidated; so are the evaluation's quality
    metrics and per-window losses (its speeds are measured anew). (Their upstream stages are not
    forced: prepare's byte-identical rerun is tests/tasks/test_prepare.py's.)"""
    files = {n: {p.name: sha(p) for p in (repo / m["dir"]).iterdir()} for n, m in MODELS.items()}
    locked = locked_md5s(repo)
    hashes = {n: locked[stage_of(n), m["dir"]] for n, m in MODELS.items()}
    firsts = {}
    for name in NAMES:
        firsts.setdefault(MODELS[name]["stage"], name)
    first = next(iter(firsts.values()))
    quality = {k: json.loads((repo / "metrics" / f"{first}.json").read_text())[k] for k in QUALITY}
    windows = locked[evaluate_stage(first), f"metrics/windows/{first}.csv"]   # the per-window losses
    stages = [stage_of(n) for n in firsts.values()] + [evaluate_stage(first)]
    out = sh(repo, "dvc", "repro", "-f", "--single-item", *stages).stdout
    assert sorted(re.findall(r"Running stage '([^']+)'", out)) == sorted(stages)
    assert files == {n: {p.name: sha(p) for p in (repo / m["dir"]).iterdir()} for n, m in MODELS.items()}
    locked = locked_md5s(repo)
    assert hashes == {n: locked[stage_of(n), m["dir"]] for n, m in MODELS.items()}
    assert quality == {k: json.loads((repo / "metrics" / f"{first}.json").read_text())[k] for k in QUALITY}
    assert windows == locked[evaluate_stage(first), f"metrics/windows/{first}.csv"]


@pytest.mark.slow
def test_a_seed_added_trains_only_its_models_and_dropped_deletes_nothing(repo, built):
    """A seed of looped: validate lists its models, then only they (and the report) run. (The claims'
    models keep their seeds: a claim needs the same seeds on both sides.) serial-s2 is trained from
    another init on other batches than serial. Last in this file: it leaves the dropped seed's files,
    which no stage makes any more (a clone pulling the study would lack them, and the report depends on
    the whole models/ and metrics/ directories: the clone test runs before it)."""
    params = (repo / "params.yaml").read_text()
    assert MODELS["serial-s2"]["seed"] == 2 and sha(repo / "models/serial-s2/model.safetensors") != \
        sha(repo / "models/serial/model.safetensors")
    try:
        (repo / "params.yaml").write_text(params.replace("    serial-int8: [2]\n", "    serial-int8: [2]\n    looped: [3]\n"))
        sh(repo, "python", "-m", "tasks.validate")                       # what make repro does first
        ran = re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "repro").stdout)
        assert sorted(ran) == ["corpus", "evaluate-replica@looped-s3", "pretrain-replica@looped-s3", "report",
                               "validate"]
        assert json.loads((repo / "models/looped-s3/meta.json").read_text())["seed"] == 3
    finally:
        (repo / "params.yaml").write_text(params)
    sh(repo, "python", "-m", "tasks.validate")
    ran = re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "repro").stdout)
    assert sorted(ran) == ["corpus", "report", "validate"]               # the models of the other seeds stay
    assert (repo / "models/looped-s3/model.safetensors").exists()         # DVC deletes no output of a dropped stage
    assert "looped-s3" not in pd.read_csv(repo / "reports/summary.csv")["model"].tolist()
