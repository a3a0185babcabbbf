"""report: one table of every model, the comparisons of params.yaml, and two plots -> reports/.

    python -m tasks.report                  # what `dvc repro report` runs

reports/summary.csv and summary.md (one row per model: metrics/<name>.json, the training time of
metrics/train/<name>.json, lineage; lm-eval scores where evaluate.tasks made them), reports/comparisons.csv, reports/val_loss_vs_tokens.png,
reports/ppl_vs_decode_speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from components import tracking  # noqa: E402
from components.errors import ParamsError, cli  # noqa: E402
from components.params import load_study  # noqa: E402

OUT = Path("reports")
ARCH = ["block", "layout", "n_loop", "dwa", "n_layer", "n_embd", "n_head", "n_kv_head", "d_ff", "ffn", "norm", "pos",
        "n_expert", "top_k", "n_attn_expert", "quant"]
METRICS = ["val_loss", "val_ppl", "val_bpb", "params", "active_params", "size_bytes",
           "prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens", "train_seconds"]
SPEED_NOTE = ("Speeds are batch-1 medians measured one stage at a time; on a shared or thermally "
              "varying machine they drift by tens of percent between stages, so treat speed ratios "
              "near 1 as ties. Losses and sizes are exact.")


def summary_table(study) -> pd.DataFrame:
    rows = []
    for name in study.evaluated():
        metrics_file = Path("metrics") / f"{name}.json"
        if not metrics_file.exists():
            raise ParamsError(f"{metrics_file} is missing: run `dvc repro` (its evaluate stage) first")
        config = json.loads((study.model_dir(name) / "config.json").read_text())
        meta = json.loads((study.model_dir(name) / "meta.json").read_text())
        curve = study.model_dir(name) / "curve.csv"
        stage_tokens = int(pd.read_csv(curve)["tokens"].max()) if curve.exists() else 0   # no curve: no training
        timing = train_timing(study, name)
        # btx/bam: the compute spent in the branches (parents after the first) before this stage
        branch_seconds = (sum(train_timing(study, b)["train_seconds"] for b in meta["parents"][1:])
                          if meta["stage"] == "upcycle" else None)
        rows.append({"model": name, "stage": meta["stage"], "method": meta.get("method", ""),
                     "parents": ",".join(meta["parents"]), "stage_tokens": stage_tokens,
                     **{k: config[k] for k in ARCH}, **json.loads(metrics_file.read_text()),
                     # this stage's training: its own tokens (not those inherited from parents) over its own time
                     "train_seconds": timing["train_seconds"], "train_tokens_per_s": timing["tokens_per_s"],
                     "branch_train_seconds": branch_seconds})
    df = pd.DataFrame(rows).set_index("model")
    return df.astype({"train_tokens_per_s": float, "branch_train_seconds": float})   # None (no training): NaN


def train_timing(study, name: str) -> dict:
    """metrics/train/<name>.json, which the stage that trains model `name` writes."""
    path = study.train_metrics(name)
    if not path.exists():
        raise ParamsError(f"{path} is missing: run `dvc repro {study.models()[name]['stage']}@{name}` first")
    return json.loads(path.read_text())


def comparisons(df: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Each pair (model, baseline): quality deltas (model - baseline) and size/speed ratios."""
    rows = []
    for a, b in pairs:
        A, B = df.loc[a], df.loc[b]
        rows.append({"model": a, "baseline": b,
                     "d_val_loss": A.val_loss - B.val_loss, "d_val_bpb": A.val_bpb - B.val_bpb,
                     "params_ratio": A.params / B.params, "active_params_ratio": A.active_params / B.active_params,
                     "size_ratio": A.size_bytes / B.size_bytes, "tokens_ratio": A.train_tokens / B.train_tokens,
                     "train_speed_ratio": A.train_tokens_per_s / B.train_tokens_per_s,
                     "prefill_speed_ratio": A.prefill_tokens_per_s / B.prefill_tokens_per_s,
                     "decode_speed_ratio": A.decode_tokens_per_s / B.decode_tokens_per_s})
    return pd.DataFrame(rows)


def plot_curves(study, path: Path) -> None:
    """Each model's validation loss against the tokens it has seen in all (its parent's first)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in study.evaluated():
        csv = study.model_dir(name) / "curve.csv"
        curve = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
        if len(curve):                  # models made without training (e.g. int8) have no curve
            meta = json.loads((study.model_dir(name) / "meta.json").read_text())
            start = meta["tokens_seen"] - curve["tokens"].iloc[-1]
            ax.plot(start + curve["tokens"], curve["val_loss"], marker=".", label=name)
    ax.set(xlabel="tokens seen", ylabel="validation loss (nats/token)", title="Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_speed(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(df["decode_tokens_per_s"], df["val_ppl"])
    for name, row in df.iterrows():
        ax.annotate(name, (row["decode_tokens_per_s"], row["val_ppl"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="decode tokens/s (batch 1, KV cache)", ylabel="validation perplexity",
           title="Quality vs decode speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lm_eval_columns(df: pd.DataFrame) -> list[str]:
    """The lm-eval scores any model has (evaluate.tasks): lm_eval.<task>.<metric>, stderrs and sample
    counts left to summary.csv."""
    return sorted(c for c in df.columns if c.startswith("lm_eval.") and "_stderr" not in c
                  and not c.endswith(".sample_len"))


def markdown(study, df: pd.DataFrame, comp: pd.DataFrame) -> str:
    table = df[["stage", "method", "parents", "block", "n_kv_head", "n_expert"] + METRICS + ["train_tokens_per_s"]
               + lm_eval_columns(df)].copy()
    speeds = ["prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens_per_s"]
    table[speeds] = table[speeds].round().astype("Int64")     # no training: no train speed (<NA>)
    table = table.round({"val_loss": 4, "val_ppl": 2, "val_bpb": 4, "train_seconds": 1} | {c: 4 for c in lm_eval_columns(df)})
    parts = [f"# Study `{study.study.name}`", "", "## Models", "", table.to_markdown(floatfmt="g"), ""]
    if len(comp):
        parts += ["## Comparisons", "", "Deltas are model - baseline (negative loss is better); "
                  "ratios are model / baseline.", "", comp.round(4).to_markdown(index=False, floatfmt="g"), ""]
    parts += [SPEED_NOTE, "", "![validation loss](val_loss_vs_tokens.png)", "",
              "![quality vs speed](ppl_vs_decode_speed.png)", ""]
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    study = load_study()
    df = summary_table(study)
    comp = comparisons(df, study.report.comparisons)

    tmp = OUT.with_name(f".{OUT.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    df.to_csv(tmp / "summary.csv")
    comp.to_csv(tmp / "comparisons.csv", index=False)
    plot_curves(study, tmp / "val_loss_vs_tokens.png")
    plot_quality_vs_speed(df, tmp / "ppl_vs_decode_speed.png")
    (tmp / "summary.md").write_text(markdown(study, df, comp))
    if OUT.exists():
        for f in OUT.iterdir():
            f.unlink()
        OUT.rmdir()
    tmp.rename(OUT)

    with tracking.stage_run(study, "report", params={"report": study.report.model_dump()}) as run_id:
        if run_id:
            tracking.mlflow.log_artifacts(str(OUT))
            tracking.mlflow.log_table(df.reset_index(), "summary.json")
            if len(comp):
                tracking.mlflow.log_table(comp, "comparisons.json")
    print((OUT / "summary.md").read_text().split("\n## Comparisons")[0][:3000])
    if len(comp):
        print(comp.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    cli(main)
