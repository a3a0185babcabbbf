"""The report's claims on a made-up study: models, metrics and per-window losses written by hand (no
training), so every Δ is known. claims.csv against the metrics files and scipy's t, each verdict and its
wording in summary.md, the one-seed label, the distillation teacher warning, the figures, and bad claims
rejected in params.yaml with their fix.

    .venv/bin/python -m pytest tests/tasks/test_report.py -q
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from components.config import ModelConfig
from components.errors import ParamsError
from components.params import load_study
from tasks import report

ROOT = Path(__file__).resolve().parents[2]

PARAMS = """\
study: {name: claims, seed: 1337, replicas: [2, 3], replicas_of: {solo-a: [], solo-b: []}}
data: {domains: {lib: ["*/*.py"]}, tokenizer: hf, hf_tokenizer: hub}
pretrain:
  variants:
    serial: {}
    parallel: {block: parallel}
    same: {}
    student: {n_layer: 1}
    solo-a: {}
    solo-b: {block: parallel}
import:
  hub: {path: hub}
distill:
  kd: {teacher: serial, student: {n_layer: 1}}
compress:
  serial-int8: {source: serial, method: int8}
report:
  comparisons: [[parallel, serial], [serial-int8, serial], [parallel, hub]]
  claims:
    - {question: Is parallel better?, model: parallel, baseline: serial, margin: 0.02}
    - {question: Is same the same?, model: same, baseline: serial, margin: 0.02}
    - {question: Does int8 cost quality?, model: serial-int8, baseline: serial, margin: 0.02}
    - {question: Is the small model worse?, model: student, baseline: serial, margin: 0.02}
    - {question: One seed each, model: solo-b, baseline: solo-a, margin: 0.02}
    - {question: Does KD help?, model: kd, baseline: student, margin: 0.02}
    - {question: Per byte on lib, model: parallel, baseline: serial, metric: domain.lib.val_bpb, margin: 0.02}
    - {question: Against the import, model: parallel, baseline: hub, margin: 0.02}
"""
# Per-token loss of each entry over the baseline level, and its per-seed jitter (seeds 1337, 2, 3).
SHIFT = {"serial": 0.0, "parallel": -0.05, "same": 0.001, "student": 0.01, "solo-a": 0.0, "solo-b": -0.03,
         "kd": 0.005, "serial-int8": -0.01, "hub": 0.5}
JITTER = {"same": [0.002, -0.001, 0.0], "student": [0.03, -0.02, 0.01], "serial-int8": [0.0005, 0.0, -0.0005],
          "parallel": [0.003, -0.002, 0.0], "kd": [0.01, -0.01, 0.0]}
SEEDS = [1337, 2, 3]
W, LIB = 40, 16                      # windows of split all; the first LIB windows are domain lib's too
TOKENS = 32


def windows_of(name: str, entry: str, seed) -> pd.DataFrame:
    """The model's windows: per-token loss = the window's difficulty + the entry's shift + its seed's jitter
    + per-window noise of its own (seeded by its name: paired windows, unpaired noise)."""
    rng = np.random.default_rng(0)
    difficulty, nbytes = rng.uniform(3, 6, W), rng.integers(40, 120, W)        # the same for every model
    jitter = JITTER.get(entry, [0.0] * 3)[SEEDS.index(seed)] if seed is not None else 0.0
    noise = np.random.default_rng(zlib.crc32(name.encode())).normal(0, 0.005, W)
    loss = (difficulty + SHIFT[entry] + jitter + noise) * TOKENS
    rows = [("all", w, TOKENS, nbytes[w], loss[w]) for w in range(W)]
    rows += [("lib", w, TOKENS, nbytes[w], loss[w]) for w in range(LIB)]
    return pd.DataFrame(rows, columns=["split", "window", "tokens", "bytes", "loss"])


def metrics_of(windows: pd.DataFrame) -> dict:
    out = {}
    for split, prefix in (("all", ""), ("lib", "domain.lib.")):
        w = windows[windows["split"] == split]
        out |= {f"{prefix}val_loss": w["loss"].sum() / w["tokens"].sum(),
                f"{prefix}val_bpb": w["loss"].sum() / w["bytes"].sum() / math.log(2)}
    return out | {"val_ppl": math.exp(out["val_loss"]), "params": 1000, "active_params": 1000, "size_bytes": 4000,
                  "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0, "train_tokens": 640,
                  "total_train_flops": 2.0e9}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The study's models, metrics and windows written by hand, and the report run once on them."""
    root = tmp_path_factory.mktemp("report")
    (root / "params.yaml").write_text(PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        study = load_study()
        config = ModelConfig(vocab_size=256).to_dict()
        for name in study.evaluated():
            m = study.models()[name]
            d = root / m["dir"]
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(config))
            before = {"val_loss_source": 5.0, "val_loss_compressed": 5.25} if m["stage"] == "compress" else {}
            (d / "meta.json").write_text(json.dumps({"stage": m["stage"], "parents": m["parents"], "tokens_seen": 640}
                                                    | before))
            windows = windows_of(name, m["entry"], m["seed"])
            metrics = metrics_of(windows) | ({"total_train_flops": 3.0e9} if name.startswith("parallel") else {})
            if m["stage"] == "import":                     # trained elsewhere: no tokens nor FLOPs here
                metrics |= {"train_tokens": 0, "total_train_flops": 0.0}
            if m["stage"] in ("pretrain", "distill"):     # a training curve ending at the final loss
                pd.DataFrame({"step": [0, 10, 20], "tokens": [0, 320, 640],
                              "val_loss": metrics["val_loss"] + np.array([2.0, 0.5, 0.0])}).to_csv(d / "curve.csv", index=False)
            (root / "metrics/windows").mkdir(parents=True, exist_ok=True)
            (root / "metrics/train").mkdir(parents=True, exist_ok=True)
            windows.to_csv(root / f"metrics/windows/{name}.csv", index=False)
            (root / f"metrics/{name}.json").write_text(json.dumps(metrics))
            (root / f"metrics/train/{name}.json").write_text(json.dumps({"train_seconds": 1.0, "tokens_per_s": 640.0}))
        report.main([])
        yield root


def claims_csv(project) -> pd.DataFrame:
    return pd.read_csv(project / "reports/claims.csv", keep_default_na=False, na_values=[""])


def val(project, name: str, metric: str = "val_loss") -> float:
    return json.loads((project / f"metrics/{name}.json").read_text())[metric]


def test_seed_claims_are_paired_t_intervals_of_the_metrics(project):
    """parallel - serial per seed, from metrics/<name>.json; mean ± t(0.975, 2) sd / √3."""
    row = claims_csv(project).iloc[0]
    deltas = [val(project, m) - val(project, b) for m, b in
              [("parallel", "serial"), ("parallel-s2", "serial-s2"), ("parallel-s3", "serial-s3")]]
    half = stats.t.ppf(0.975, 2) * np.std(deltas, ddof=1) / math.sqrt(3)
    assert (row.n_seeds, row.seeds, row.ci_method) == (3, "1337,2,3", "t over 3 seeds")
    assert (row.mean_delta, row.ci_low, row.ci_high) == pytest.approx(
        (np.mean(deltas), np.mean(deltas) - half, np.mean(deltas) + half), abs=1e-12)
    assert row.window_ci_low < row.mean_delta < row.window_ci_high     # shown too; the t interval decides


def test_each_verdict(project):
    claims = claims_csv(project).set_index("question")
    assert claims.loc["Is parallel better?", "verdict"] == "better"
    assert claims.loc["Is same the same?", ["verdict", "within_margin"]].tolist() == ["equivalent", True]
    assert claims.loc["Does int8 cost quality?", ["verdict", "within_margin"]].tolist() == ["better", True]
    assert claims.loc["Is the small model worse?", "verdict"] == "inconclusive"
    assert claims.loc["Per byte on lib", "verdict"] == "better"
    summary = (project / "reports/summary.md").read_text()
    for text in ("| better ", "| equivalent within ±0.02 ", "| better, within ±0.02 ", "| inconclusive "):
        assert text in summary


def test_one_seed_is_decided_by_the_window_bootstrap_and_says_so(project):
    """solo-a and solo-b have one seed: the interval is over windows, the label says seed variance is
    unknown, and it is the bootstrap of components/stats.py on the two window files."""
    row = claims_csv(project).set_index("question").loc["One seed each"]
    assert (row.n_seeds, row.ci_method) == (1, "window bootstrap, 1 seed: seed variance unknown")
    assert (row.ci_low, row.ci_high) == (row.window_ci_low, row.window_ci_high)
    assert row.mean_delta == pytest.approx(val(project, "solo-b") - val(project, "solo-a"), abs=1e-12)
    assert row.ci_low < row.mean_delta < row.ci_high < 0 and row.verdict == "better"
    assert "window bootstrap, 1 seed: seed variance unknown" in (project / "reports/summary.md").read_text()


def test_the_window_bootstrap_is_deterministic(project, monkeypatch):
    """The same inputs give the same claims.csv, to the last digit (a fixed resampling seed)."""
    before = (project / "reports/claims.csv").read_text()
    monkeypatch.chdir(project)
    report.main([])
    assert (project / "reports/claims.csv").read_text() == before


def test_the_stages_console_has_no_warnings(project):
    """No deprecation noise where the user reads: pandas 3 warned about DataFrame.join's suffixes (ours) and
    about what MLflow's log_table asks it (MLflow's, filtered)."""
    r = subprocess.run([sys.executable, "-m", "tasks.report"], cwd=project, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr


def test_an_import_pairs_with_every_seed(project):
    row = claims_csv(project).set_index("question").loc["Against the import"]
    assert (row.n_seeds, row.seeds) == (3, "1337,2,3")
    assert row.mean_delta == pytest.approx(np.mean([val(project, p) - val(project, "hub")
                                                    for p in ("parallel", "parallel-s2", "parallel-s3")]))


def test_a_distilled_model_shows_its_teacher_gap_and_warns(project):
    """kd's teacher serial is not clearly better than the baseline student (an inconclusive teacher gap):
    summary.md warns that KD may have nothing to pass on."""
    row = claims_csv(project).set_index("question").loc["Does KD help?"]
    assert (row.teacher, row.teacher_verdict) == ("serial", "inconclusive")
    assert row.teacher_mean_delta == pytest.approx(-claims_csv(project).set_index("question").loc[
        "Is the small model worse?", "mean_delta"])
    summary = (project / "reports/summary.md").read_text()
    assert "`kd`: its teacher `serial` is not clearly better than the baseline `student`" in summary
    assert pd.isna(claims_csv(project).iloc[0].teacher)                      # not a distill claim: no teacher


def test_comparisons_read_a_difference_per_token_and_per_flop(project):
    row = pd.read_csv(project / "reports/comparisons.csv").iloc[0]
    assert (row.model, row.baseline, row.tokens_ratio, row.train_flops_ratio) == ("parallel", "serial", 1.0, 1.5)
    assert math.isnan(row.model_d_val_loss_before_recovery)              # not compressed: no such step
    int8 = pd.read_csv(project / "reports/comparisons.csv").iloc[1]
    assert (int8.model, int8.model_d_val_loss_before_recovery) == ("serial-int8", 0.25)
    hub = pd.read_csv(project / "reports/comparisons.csv").iloc[2]     # an import trained no tokens here
    assert (hub.baseline, hub.params_ratio) == ("hub", pytest.approx(1.0)) and math.isnan(hub.tokens_ratio)


def test_the_curves_of_a_study_that_trained_nothing(project, tmp_path):
    """Only an import: the curves figure says so, without matplotlib's empty-legend warning."""
    df = pd.read_csv(project / "reports/summary.csv", index_col="model").loc[["hub"]]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.chdir(project)
        warnings.simplefilter("error")
        report.plot_curves(load_study(), df, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5_000


def test_summary_rows_carry_entry_and_seed(project):
    df = pd.read_csv(project / "reports/summary.csv", index_col="model")
    assert df.loc["parallel-s2", ["entry", "seed"]].tolist() == ["parallel", 2]
    assert df.loc["serial", "seed"] == 1337 and pd.isna(df.loc["hub", "seed"])


def test_figures_and_the_verdict_table(project):
    for png in ("claims.png", "claims_curves.png", "val_loss_vs_tokens.png", "ppl_vs_decode_speed.png"):
        assert (project / "reports" / png).stat().st_size > 10_000
    summary = re.sub(" +", " ", (project / "reports/summary.md").read_text())     # markdown's column padding
    header = "| question | model | baseline | metric | n seeds | mean Δ | 95% CI | CI method | margin | verdict |"
    assert header in summary and summary.index("## Claims") < summary.index("## Models")
    assert "speed" not in summary.split("## Claims")[1].split("## Models")[0]   # verdicts never show speeds


def test_the_report_run_carries_the_claims(project, tmp_path):
    """MLflow's report run: the claims table (claims.json) and the files of reports/, claims.csv among them."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")   # the fixture's report run
    [run] = client.search_runs([client.get_experiment_by_name("claims").experiment_id], "tags.stage = 'report'")
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "claims.json", str(tmp_path))).read_text())
    verdicts = [row[table["columns"].index("verdict")] for row in table["data"]]
    assert verdicts == claims_csv(project)["verdict"].tolist()
    assert "claims.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}


def problems(tmp_path, claims: str, study: str = "study: {seed: 1337, replicas: [2]}\n") -> str:
    (tmp_path / "params.yaml").write_text(study + "pretrain:\n  variants:\n    serial: {}\n    parallel: {block: parallel}\n"
                                          "data: {domains: {lib: ['*.py']}}\n" + f"report:\n  claims:\n{claims}")
    with pytest.raises(ParamsError) as e:
        load_study(tmp_path / "params.yaml")
    return str(e.value)


def claim(**kw) -> str:
    return "    - " + json.dumps({"question": "q", "model": "parallel", "baseline": "serial", "margin": 0.02} | kw) + "\n"


@pytest.mark.parametrize("kw, expected", [
    ({"model": "paralel"}, "report.claims.0.model: unknown model 'paralel'; did you mean 'parallel'?"),
    ({"baseline": "serial-kd"}, "report.claims.0.baseline: unknown model 'serial-kd'; did you mean 'serial'?"),
    ({"baseline": "parallel"}, "report.claims.0: model and baseline are both 'parallel'"),
    ({"metric": "val_los"}, "report.claims.0.metric: unknown metric 'val_los'; did you mean 'val_loss'?"),
    ({"metric": "val_ppl"}, "report.claims.0.metric: val_ppl is exp(val_loss), so it has the same verdict"),
    ({"metric": "domain.lbi.val_loss"}, "report.claims.0.metric: domain.lbi.val_loss: unknown domain 'lbi'; "
                                        "did you mean 'lib'?"),
    ({"metric": "lm_eval.arc.acc"}, "report.claims.0.metric: lm_eval.arc.acc is an lm-eval score, but "
                                    "evaluate.tasks is empty"),
    ({"higher_is_better": True}, "report.claims.0.higher_is_better: val_loss is a loss, lower is better"),
    ({"margin": 0}, "report.claims.0.margin: 0 must be > 0"),
    ({"margin": -0.02}, "report.claims.0.margin: -0.02 must be > 0"),
])
def test_bad_claims_are_named_with_their_fix(tmp_path, kw, expected):
    assert expected in problems(tmp_path, claim(**kw))


def test_a_missing_margin_says_what_it_is(tmp_path):
    text = "    - {question: q, model: parallel, baseline: serial}\n"
    assert "report.claims.0.margin: required but missing. Add it: the equivalence margin" in problems(tmp_path, text)


def test_claims_whose_seeds_do_not_pair_are_rejected(tmp_path):
    msg = problems(tmp_path, claim(), study="study: {seed: 1337, replicas: [2], replicas_of: {parallel: []}}\n")
    assert ("report.claims.0: model 'parallel' has seeds [1337] and baseline 'serial' has [1337, 2]: a paired "
            "comparison needs the same seeds on both sides") in msg


def test_lm_eval_claims_need_seeds_and_a_direction(tmp_path):
    one_seed = "study: {seed: 1337}\nevaluate: {tasks: [arc]}\n"
    msg = problems(tmp_path, claim(metric="lm_eval.arc.acc"), study=one_seed)
    assert "report.claims.0.higher_is_better: required for an lm-eval metric" in msg
    msg = problems(tmp_path, claim(metric="lm_eval.arc.acc", higher_is_better=True), study=one_seed)
    assert "report.claims.0.metric: lm_eval.arc.acc has no per-window scores" in msg and "has one seed" in msg
    (tmp_path / "params.yaml").write_text("study: {seed: 1337, replicas: [2]}\nevaluate: {tasks: [arc]}\n"
                                          "pretrain:\n  variants:\n    serial: {}\n    parallel: {block: parallel}\n"
                                          "report:\n  claims:\n" + claim(metric="lm_eval.arc.acc", higher_is_better=True))
    assert load_study(tmp_path / "params.yaml").report.claims[0].higher_is_better is True


def test_lm_eval_claims_take_their_direction_and_need_the_score(project, tmp_path, monkeypatch):
    """An accuracy claim (higher is better) on made-up scores: parallel's +0.05 is `better`, over seeds
    only (no windows); a model without the score stops the report with the fix."""
    copy = tmp_path / "copy"
    for directory in ("models", "metrics"):
        shutil.copytree(project / directory, copy / directory)
    params = (project / "params.yaml").read_text().replace(
        "  claims:\n", "  claims:\n    - {question: acc, model: parallel, baseline: serial, metric: lm_eval.arc.acc,"
                       " higher_is_better: true, margin: 0.01}\n") + "evaluate: {tasks: [arc]}\n"
    (copy / "params.yaml").write_text(params)
    monkeypatch.chdir(copy)
    with pytest.raises(ParamsError, match=r"metrics/parallel.json has no lm_eval.arc.acc \(it has none of its kind\): "
                                          r"fix the metric in report.claims, or add its task to evaluate.tasks"):
        report.main([])
    for f in (copy / "metrics").glob("*.json"):
        acc = 0.5 + 0.05 * f.stem.startswith("parallel") + 0.001 * len(f.stem)
        f.write_text(json.dumps(json.loads(f.read_text()) | {"lm_eval.arc.acc": acc}))
    report.main([])
    row = claims_csv(copy).iloc[0]
    assert (row.question, row.ci_method, row.verdict) == ("acc", "t over 3 seeds", "better")
    assert pd.isna(row.window_ci_low) and row.mean_delta == pytest.approx(0.05 + 0.002)   # names 2 letters longer
