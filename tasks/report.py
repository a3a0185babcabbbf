"""report: one table of every model, a verdict on each claim of params.yaml, the comparisons, and plots -> reports/.

    python -m tasks.report                  # what `dvc repro report` runs

reports/summary.csv and summary.md (one row per model and seed: metrics/<name>.json, the training time of
metrics/train/<name>.json, lineage; lm-eval scores where evaluate.tasks made them), reports/claims.csv (each
claim of report.claims: Δ = model - baseline paired by seed, its 95% interval and verdict; docs/verdicts.md),
reports/comparisons.csv (report.comparisons: single runs of the primary seed), reports/claims.png,
reports/claims_curves.png (claims between pretrain variants: Δ over training), reports/val_loss_vs_tokens.png,
reports/ppl_vs_decode_speed.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components import tracking  # noqa: E402
from components.errors import ParamsError, cli  # noqa: E402
from components.params import Claim, claim_pairs, load_study  # noqa: E402
from components.stats import Interval, bootstrap_interval, t_interval, verdict, verdict_text  # noqa: E402

# MLflow 3's log_table asks pandas 3 for the "object" columns of each table, which warns (Pandas4Warning):
# MLflow's code, nothing for a user to act on.
warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes are included by select_dtypes")

OUT = Path("reports")
ARCH = ["block", "layout", "n_loop", "dwa", "n_layer", "n_embd", "n_head", "n_kv_head", "d_ff", "ffn", "norm", "pos",
        "n_expert", "top_k", "n_attn_expert", "quant"]
METRICS = ["val_loss", "val_ppl", "val_bpb", "params", "active_params", "size_bytes",
           "prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens", "total_train_flops", "train_seconds"]
SPEED_NOTE = ("Speeds are batch-1 medians measured one stage at a time; on a shared or thermally "
              "varying machine they drift by tens of percent between stages, so a speed ratio here is one "
              "noisy run, not a finding: compare speeds with benchmarks/, which interleave the contenders. "
              "Losses and sizes are exact for the one seed shown; the claims above give a loss difference's "
              "uncertainty.")
CLAIMS_NOTE = ("Δ = model - baseline, paired by seed (lower is better for losses). The 95% interval is over "
               "seeds (t, n - 1 degrees of freedom) when there are 2 or more, else a paired bootstrap over the "
               "validation windows of the one seed, which leaves out the seed-to-seed variance. better/worse: "
               "the interval excludes 0; equivalent: it lies inside ±margin; otherwise inconclusive "
               "(docs/verdicts.md).")
VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "inconclusive": "tab:gray"}


def summary_table(study) -> pd.DataFrame:
    rows, models = [], study.models()
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
        rows.append({"model": name, "entry": models[name]["entry"], "seed": models[name]["seed"],
                     "stage": meta["stage"], "method": meta.get("method", ""),
                     "parents": ",".join(meta["parents"]), "stage_tokens": stage_tokens,
                     # compress: what the transform alone cost its source, before any recovery (the stage's
                     # curve batches: train.eval_batches of the validation split, both models on the same ones)
                     "d_val_loss_before_recovery": (meta["val_loss_compressed"] - meta["val_loss_source"]
                                                    if "val_loss_source" in meta else math.nan),
                     **{k: config[k] for k in ARCH}, **json.loads(metrics_file.read_text()),
                     # this stage's training: its own tokens (not those inherited from parents) over its own time
                     "train_seconds": timing["train_seconds"], "train_tokens_per_s": timing["tokens_per_s"],
                     "branch_train_seconds": branch_seconds})
    df = pd.DataFrame(rows).set_index("model")
    if "total_train_flops" not in df:                     # models evaluated before training FLOPs were counted
        df["total_train_flops"] = math.nan
    # None (no training, an import's seed): NaN / <NA>
    return df.astype({"train_tokens_per_s": float, "branch_train_seconds": float, "seed": "Int64"})


def train_timing(study, name: str) -> dict:
    """metrics/train/<name>.json, which the stage that trains model `name` writes."""
    path = study.train_metrics(name)
    if not path.exists():
        raise ParamsError(f"{path} is missing: run `dvc repro {study.stage_of(name)}` first")
    return json.loads(path.read_text())


def ratio(a: float, b: float) -> float:
    """a / b, NaN where the baseline has none (an imported model trained no tokens here, nor FLOPs)."""
    return a / b if b else math.nan


def comparisons(df: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Each pair (model, baseline), single runs: quality deltas (model - baseline) and size/speed ratios."""
    rows = []
    for a, b in pairs:
        A, B = df.loc[a], df.loc[b]
        rows.append({"model": a, "baseline": b,
                     "d_val_loss": A.val_loss - B.val_loss, "d_val_bpb": A.val_bpb - B.val_bpb,
                     "model_d_val_loss_before_recovery": A.d_val_loss_before_recovery,   # compress: vs its source
                     "params_ratio": ratio(A.params, B.params),
                     "active_params_ratio": ratio(A.active_params, B.active_params),
                     "size_ratio": ratio(A.size_bytes, B.size_bytes), "tokens_ratio": ratio(A.train_tokens, B.train_tokens),
                     # the lineage's training compute (components/flops.py): read a difference per FLOP too
                     "train_flops_ratio": ratio(A.total_train_flops, B.total_train_flops),
                     "train_speed_ratio": ratio(A.train_tokens_per_s, B.train_tokens_per_s),
                     "prefill_speed_ratio": ratio(A.prefill_tokens_per_s, B.prefill_tokens_per_s),
                     "decode_speed_ratio": ratio(A.decode_tokens_per_s, B.decode_tokens_per_s)})
    return pd.DataFrame(rows)


# Claims: one row each, Δ = model - baseline per seed pair (components/stats.py does the statistics).

def claim_row(study, df: pd.DataFrame, claim: Claim) -> dict:
    """The verdict on one claim: the seed t interval with 2+ seed pairs, else the window bootstrap."""
    pairs = claim_pairs(study, claim.model, claim.baseline)
    assert pairs, "claim_problems rejects claims whose seeds do not pair"
    deltas = [value(df, m, claim.metric) - value(df, b, claim.metric) for m, b in pairs]
    windows = window_interval(pairs, claim.metric)
    if len(pairs) >= 2:
        ci, method = t_interval(deltas), f"t over {len(pairs)} seeds"
    elif windows is not None:
        ci, method = windows, "window bootstrap, 1 seed: seed variance unknown"
    else:                               # an lm-eval score, or models scored on other windows
        ci, method = None, "none: 1 seed, and no paired windows"
    word, within = verdict(ci, claim.margin, bool(claim.higher_is_better))
    seeds = [df.loc[m, "seed"] if pd.notna(df.loc[m, "seed"]) else df.loc[b, "seed"] for m, b in pairs]
    return {"question": claim.question, "model": claim.model, "baseline": claim.baseline, "metric": claim.metric,
            "n_seeds": len(pairs), "seeds": ",".join(str(s) for s in seeds if pd.notna(s)),
            "mean_delta": float(np.mean(deltas)), "ci_low": ci.low if ci else math.nan,
            "ci_high": ci.high if ci else math.nan, "ci_method": method,
            "window_ci_low": windows.low if windows else math.nan,
            "window_ci_high": windows.high if windows else math.nan,
            "margin": claim.margin, "verdict": word, "within_margin": within}


def value(df: pd.DataFrame, name: str, metric: str) -> float:
    """Model `name`'s `metric` from metrics/<name>.json (an lm-eval score only exists where evaluate made it)."""
    if metric not in df.columns or pd.isna(df.loc[name, metric]):
        have = sorted(c for c in df.columns if c.startswith(metric.split(".")[0] + ".") and pd.notna(df.loc[name, c]))
        raise ParamsError(f"metrics/{name}.json has no {metric} (it has {', '.join(have) or 'none of its kind'}): "
                          f"fix the metric in report.claims, or add its task to evaluate.tasks and run `dvc repro`")
    return float(df.loc[name, metric])


def window_interval(pairs: list[tuple[str, str]], metric: str) -> Interval | None:
    """The paired window bootstrap of Δ `metric` (val_loss, val_bpb, domain.<d>.*), averaged over the seed
    pairs; None for other metrics, or when model and baseline were scored on different windows
    (another tokenizer or block_size)."""
    if not metric.startswith(("val_", "domain.")):
        return None
    split = metric.split(".")[1] if metric.startswith("domain.") else "all"
    denom, scale = ("bytes", 1 / math.log(2)) if metric.endswith("val_bpb") else ("tokens", 1.0)
    sides = [[read_windows(name, split) for name in pair] for pair in pairs]
    first = sides[0][0]
    if any(len(w) != len(first) or not (w[["tokens", "bytes"]].values == first[["tokens", "bytes"]].values).all()
           for pair in sides for w in pair):
        return None
    diff = np.mean([m["loss"].to_numpy() - b["loss"].to_numpy() for m, b in sides], axis=0)
    return bootstrap_interval(diff, first[denom].to_numpy(), scale)


def read_windows(name: str, split: str) -> pd.DataFrame:
    """metrics/windows/<name>.csv (evaluate writes it): the windows of `split`, in order."""
    path = Path("metrics/windows") / f"{name}.csv"
    if not path.exists():
        raise ParamsError(f"{path} is missing: run `dvc repro` (the evaluate stage of {name}) first")
    w = pd.read_csv(path)
    return w[w["split"] == split].sort_values("window").reset_index(drop=True)


def claims_table(study, df: pd.DataFrame) -> pd.DataFrame:
    """Every claim's row; a distilled model's also holds its teacher - baseline (KD helps only when the
    teacher is better than the baseline)."""
    rows = []
    for claim in study.report.claims:
        row = claim_row(study, df, claim)
        teacher = study.distill[claim.model].teacher if claim.model in study.distill else None
        if teacher is not None and teacher != claim.baseline:
            row |= teacher_gap(study, df, claim.model_copy(update={"model": teacher}))
        rows.append(row)
    columns = ["question", "model", "baseline", "metric", "n_seeds", "seeds", "mean_delta", "ci_low", "ci_high",
               "ci_method", "window_ci_low", "window_ci_high", "margin", "verdict", "within_margin",
               "teacher", "teacher_mean_delta", "teacher_ci_low", "teacher_ci_high", "teacher_verdict"]
    return pd.DataFrame(rows, columns=columns)


def teacher_gap(study, df: pd.DataFrame, claim: Claim) -> dict:
    """teacher - baseline, as a claim of its own; unpaired seeds leave it open."""
    if claim_pairs(study, claim.model, claim.baseline) is None:
        return {"teacher": claim.model, "teacher_verdict": "not paired: the teacher and baseline have other seeds"}
    row = claim_row(study, df, claim)
    return {"teacher": claim.model, "teacher_mean_delta": row["mean_delta"], "teacher_ci_low": row["ci_low"],
            "teacher_ci_high": row["ci_high"], "teacher_verdict": row["verdict"]}


def teacher_warnings(claims: pd.DataFrame) -> list[str]:
    """A student's claim whose teacher is not clearly better than the baseline: KD cannot help then."""
    return [f"- `{r.model}`: its teacher `{r.teacher}` is not clearly better than the baseline `{r.baseline}` "
            f"on {r.metric} (teacher - baseline: " + (f"{r.teacher_mean_delta:+.4g}, 95% CI "
            f"{interval_text(r.teacher_ci_low, r.teacher_ci_high)}, " if pd.notna(r.teacher_mean_delta) else "")
            + f"{r.teacher_verdict}), so distillation may have nothing better to pass on: train a stronger teacher "
            f"before reading this claim"
            for r in claims.itertuples() if pd.notna(r.teacher) and r.teacher_verdict != "better"]


def interval_text(low: float, high: float) -> str:
    return "none" if pd.isna(low) else f"[{low:+.4g}, {high:+.4g}]"


def verdict_table(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims as summary.md shows them."""
    return pd.DataFrame({
        "question": claims["question"], "model": claims["model"], "baseline": claims["baseline"],
        "metric": claims["metric"], "n seeds": claims["n_seeds"],
        "mean Δ": claims["mean_delta"].map(lambda v: f"{v:+.4g}"),
        "95% CI": [interval_text(lo, hi) for lo, hi in zip(claims["ci_low"], claims["ci_high"])],
        "CI method": claims["ci_method"], "margin": claims["margin"].map(lambda v: f"±{v:g}"),
        "verdict": [verdict_text(w, within, m) for w, within, m in
                    zip(claims["verdict"], claims["within_margin"], claims["margin"])]})


# Figures. One style per entry (model name of params.yaml), the same in every figure: ten colours, then the
# next ten entries dashed, dotted, ... (40 distinct); every seed of an entry is drawn in the entry's style.

LINESTYLES, MARKERS = ["-", "--", ":", "-."], ["o", "s", "^", "D"]


def entry_styles(entries: list[str]) -> dict[str, dict]:
    colours = plt.get_cmap("tab10").colors
    return {e: {"color": colours[i % 10], "linestyle": LINESTYLES[i // 10 % 4], "marker": MARKERS[i // 10 % 4]}
            for i, e in enumerate(entries)}


def plot_curves(study, df: pd.DataFrame, path: Path) -> None:
    """Each model's validation loss against the tokens it has seen in all (its parent's first), one panel
    per stage kind, the legend outside the axes."""
    curves = {}
    for name in df.index:
        csv = study.model_dir(name) / "curve.csv"
        curve = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
        if len(curve):                  # models made without training (e.g. int8, imports) have no curve
            meta = json.loads((study.model_dir(name) / "meta.json").read_text())
            curves[name] = (meta["tokens_seen"] - curve["tokens"].iloc[-1] + curve["tokens"], curve["val_loss"])
    kinds = list(dict.fromkeys(df.loc[list(curves), "stage"])) or ["pretrain"]
    styles = entry_styles(list(dict.fromkeys(df["entry"])))
    heights = [max(3.0, 0.2 * df.loc[[n for n in curves if df.loc[n, "stage"] == k], "entry"].nunique()) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, sum(heights) + 0.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights})     # room for each panel's legend
    for ax, kind in zip(axes[:, 0], kinds):
        labelled = set()
        for name, (tokens, loss) in curves.items():
            entry = df.loc[name, "entry"]
            if df.loc[name, "stage"] == kind:
                n = int((df["entry"] == entry).sum())
                label = None if entry in labelled else entry + (f" ({n} seeds)" if n > 1 else "")
                ax.plot(tokens, loss, lw=1.2, alpha=0.9, label=label, **{**styles[entry], "marker": None})
                labelled.add(entry)
        ax.set(ylabel="val loss (nats/token)", title=f"{kind}")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
        else:                           # only imports and int8 copies: nothing trained here
            ax.text(0.5, 0.5, "no model of this study was trained", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("tokens seen (parents' included)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_speed(df: pd.DataFrame, path: Path) -> None:
    """One point per model and seed in its entry's style, labelled with the entry's number at one of four
    offsets in turn (neighbouring labels rarely overprint); the key (number, entry) outside the axes."""
    entries = list(dict.fromkeys(df["entry"]))
    styles = entry_styles(entries)
    offsets = [(4, 4), (4, -11), (-11, 4), (-11, -11)]
    fig, ax = plt.subplots(figsize=(10, max(4.5, 0.22 * len(entries))))
    for number, entry in enumerate(entries, 1):
        rows = df[df["entry"] == entry]
        ax.scatter(rows["decode_tokens_per_s"], rows["val_ppl"], color=styles[entry]["color"],
                   marker=styles[entry]["marker"], label=f"{number} {entry}")
        for x, y in zip(rows["decode_tokens_per_s"], rows["val_ppl"]):
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=offsets[number % 4], fontsize=7,
                        color=styles[entry]["color"])
    ax.set(xlabel="decode tokens/s (batch 1, KV cache; single runs)", ylabel="validation perplexity",
           title="Quality vs decode speed")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False,
              ncol=1 if len(entries) <= 30 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_claims(claims: pd.DataFrame, path: Path) -> None:
    """Δ with its 95% interval per claim, coloured by verdict (thin grey: the window bootstrap where the
    seed interval decides), 0 and the ±margin band; one panel per metric (their units differ)."""
    metrics = list(dict.fromkeys(claims["metric"]))
    heights = [len(claims[claims["metric"] == m]) for m in metrics]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 1.2 + 0.5 * sum(heights) + 0.6 * len(metrics)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, metric in zip(axes[:, 0], metrics):
        rows = claims[claims["metric"] == metric].reset_index(drop=True)
        for y, r in rows.iterrows():
            ax.fill_betweenx([y - 0.4, y + 0.4], -r.margin, r.margin, color="tab:blue", alpha=0.08, lw=0)
            if pd.notna(r.ci_low):
                ax.errorbar(r.mean_delta, y, xerr=[[r.mean_delta - r.ci_low], [r.ci_high - r.mean_delta]],
                            fmt="o", color=VERDICT_COLOURS[r.verdict], capsize=3, lw=2)
            else:
                ax.plot(r.mean_delta, y, "x", color=VERDICT_COLOURS[r.verdict])
            if r.n_seeds >= 2 and pd.notna(r.window_ci_low):
                ax.plot([r.window_ci_low, r.window_ci_high], [y + 0.25] * 2, color="0.5", lw=1)
        ax.axvline(0, color="black", lw=0.8)
        labels = [f"{textwrap.shorten(r.question, 60)}\n(n={r.n_seeds}: {r.verdict})" for r in rows.itertuples()]
        ax.set_yticks(range(len(rows)), labels, fontsize="small")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel(f"Δ {metric} (model - baseline), 95% CI; shaded: ±margin")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_claim_curves(study, path: Path) -> bool:
    """Δ val_loss over training for the claims between pretrain variants: one thin line per seed pair, their
    mean, and its 95% t band with 2+ seeds, at the steps every curve.csv has. The curves are scored on
    train.eval_batches, not on the evaluate stage's windows. False: no such claim, no figure."""
    models, pairs = study.models(), {}
    for c in study.report.claims:               # one panel per (model, baseline): the curves are val_loss alone
        if models[c.model]["stage"] == models[c.baseline]["stage"] == "pretrain":
            pairs.setdefault((c.model, c.baseline), []).append(c)
    if not pairs:
        return False
    fig, axes = plt.subplots(len(pairs), 1, figsize=(10, 2.8 * len(pairs)), squeeze=False)
    for ax, ((model, baseline), claims) in zip(axes[:, 0], pairs.items()):
        curves = [delta_curve(study, m, b) for m, b in claim_pairs(study, model, baseline)]
        d = pd.concat([c["delta"] for c in curves], axis=1, join="inner")     # (steps, seed pairs)
        tokens = curves[0]["tokens"].loc[d.index]
        ax.plot(tokens, d, color="tab:purple", lw=0.8, alpha=0.5)
        ax.plot(tokens, d.mean(axis=1), color="tab:purple", lw=2, label=f"mean of {d.shape[1]} seeds" if d.shape[1] > 1 else "1 seed")
        if d.shape[1] >= 2:
            band = np.array([t_interval(row) for row in d.to_numpy()])
            ax.fill_between(tokens, band[:, 1], band[:, 2], color="tab:purple", alpha=0.2, label="95% CI (t)")
        ax.axhline(0, color="black", lw=0.8)
        if margin := next((c.margin for c in claims if c.metric == "val_loss"), None):
            ax.axhspan(-margin, margin, color="tab:blue", alpha=0.08, label=f"±{margin:g} (margin)")
        ax.set(title=textwrap.shorten(" / ".join(c.question for c in claims), 90),
               ylabel=f"Δ val_loss\n{model} - {baseline}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    axes[-1, 0].set_xlabel("tokens seen (training curve, train.eval_batches)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def delta_curve(study, model: str, baseline: str) -> pd.DataFrame:
    """Indexed by step: the model's tokens and val_loss(model) - val_loss(baseline) at the steps both logged."""
    m, b = (pd.read_csv(study.model_dir(n) / "curve.csv").set_index("step") for n in (model, baseline))
    both = m[["tokens", "val_loss"]].join(b["val_loss"].rename("val_loss_b"), how="inner")
    return pd.DataFrame({"tokens": both["tokens"], "delta": both["val_loss"] - both["val_loss_b"]})


def lm_eval_columns(df: pd.DataFrame) -> list[str]:
    """The lm-eval scores any model has (evaluate.tasks): lm_eval.<task>.<metric>, stderrs and sample
    counts left to summary.csv."""
    return sorted(c for c in df.columns if c.startswith("lm_eval.") and "_stderr" not in c
                  and not c.endswith(".sample_len"))


def provenance(study) -> str:
    """Which Python and which prepared data made these numbers (data_sha256 of the models' meta.json)."""
    corpus = {json.loads((study.model_dir(n) / "meta.json").read_text()).get("data_sha256")
              for n, m in study.models().items() if m["stage"] != "import"} - {None}
    return (f"Python {platform.python_version()} on {platform.machine()}; prepared data (corpus and tokenizer) "
            f"sha256 {', '.join(sorted(h[:16] for h in corpus)) or 'unknown'}.")


def markdown(study, df: pd.DataFrame, claims: pd.DataFrame, comp: pd.DataFrame, curves: bool) -> str:
    table = df[["entry", "seed", "stage", "method", "parents", "block", "n_kv_head", "n_expert"] + METRICS
               + ["train_tokens_per_s"] + lm_eval_columns(df)].copy()
    speeds = ["prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens_per_s"]
    table[speeds] = table[speeds].round().astype("Int64")     # no training: no train speed (<NA>)
    table = table.round({"val_loss": 4, "val_ppl": 2, "val_bpb": 4, "train_seconds": 1} | {c: 4 for c in lm_eval_columns(df)})
    parts = [f"# Study `{study.study.name}`", "", provenance(study), ""]
    if len(claims):
        parts += ["## Claims", "", CLAIMS_NOTE, "", verdict_table(claims).to_markdown(index=False), ""]
        if warnings := teacher_warnings(claims):
            parts += ["**Distillation:**", "", *warnings, ""]
        parts += ["![claims](claims.png)", ""] + (["![claims over training](claims_curves.png)", ""] if curves else [])
    parts += ["## Models", "", table.to_markdown(floatfmt="g"), ""]
    if len(comp):
        parts += ["## Comparisons (single runs)", "", "One run each (the primary seed), no interval: a difference "
                  "here is not a finding; declare a claim for a verdict. Deltas are model - baseline (negative "
                  "loss is better); ratios are model / baseline. model_d_val_loss_before_recovery: a compressed "
                  "model's loss right after the transform minus its source's (on the stage's curve batches), "
                  "before its recovery steps; d_val_loss is after them.", "",
                  comp.round(4).to_markdown(index=False, floatfmt="g"), ""]
    parts += [SPEED_NOTE, "", "![validation loss](val_loss_vs_tokens.png)", "",
              "![quality vs speed](ppl_vs_decode_speed.png)", ""]
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    study = load_study()
    df = summary_table(study)
    claims = claims_table(study, df)
    comp = comparisons(df, study.report.comparisons)

    tmp = OUT.with_name(f".{OUT.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    df.to_csv(tmp / "summary.csv")
    claims.to_csv(tmp / "claims.csv", index=False)
    comp.to_csv(tmp / "comparisons.csv", index=False)
    plot_curves(study, df, tmp / "val_loss_vs_tokens.png")
    plot_quality_vs_speed(df, tmp / "ppl_vs_decode_speed.png")
    curves = len(claims) > 0 and plot_claim_curves(study, tmp / "claims_curves.png")
    if len(claims):
        plot_claims(claims, tmp / "claims.png")
    (tmp / "summary.md").write_text(markdown(study, df, claims, comp, curves))
    if OUT.exists():
        for f in OUT.iterdir():
            f.unlink()
        OUT.rmdir()
    tmp.rename(OUT)

    with tracking.stage_run(study, "report", params={"report": study.report.model_dump()}) as run_id:
        if run_id:
            tracking.mlflow.log_artifacts(str(OUT))
            tracking.mlflow.log_table(df.reset_index(), "summary.json")
            if len(claims):
                tracking.mlflow.log_table(claims, "claims.json")
            if len(comp):
                tracking.mlflow.log_table(comp, "comparisons.json")
    print((OUT / "summary.md").read_text().split("\n## Comparisons")[0][:4000])


if __name__ == "__main__":
    cli(main)
