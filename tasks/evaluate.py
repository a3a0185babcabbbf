"""evaluate@<model>: quality, size and speed of one model -> metrics/<model>.json, metrics/windows/<model>.csv.

    python -m tasks.evaluate parallel       # what `dvc repro evaluate@parallel` runs

Separate from training, so changing `evaluate` settings never retrains. Runs on the accelerator the
study trains on (train.accelerator; auto: cuda, else mps, else the CPU), recorded as `device`.
Quality: mean next-token loss over the non-overlapping block_size windows of the whole validation split
(evaluate.max_tokens: of its start only), its perplexity, and bits per byte (tokenizer-independent); the
same for each data.domains entry's own validation split (domain.<d>.val_loss, ...). Each scored window's
token count, byte count and summed loss go to metrics/windows/<model>.csv, for resampling. Speed: batch-1
prefill and KV-cached decode tokens/s (latency), and batched decode tokens/s (`decode_batch` sequences with
`decode_context` tokens cached: throughput, where the cache's size shows), each the median of `speed_runs`
timed runs after `speed_warmup` untimed ones, with the thread count recorded (`evaluate.compile`: the
decode steps by the compiled fixed-shape step, CUDA graphs on a GPU, recorded as `decode_compiled`; its
compilation in one more untimed run); and the generation cache's bytes
per token of context and per sequence (components/flops.py cache_bytes).
lm-eval tasks (`evaluate.tasks`, needs `pip install -e '.[eval]'`): scored through components/harness.py
on the model already loaded, as flat numbers `lm_eval.<task>.<metric>` (acc, acc_norm, their stderr, ...);
the task names are checked when the stage starts, before any compute.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components import tracking
from components.artifacts import PREPARED, dumps, load_input, prepared_meta
from components.data import load_tokens, window_batch
from components.device import device_name, resolve_device
from components.errors import ParamsError, cli, stage_clock
from components.files import write_atomic
from components.params import load_study
from components.tokenizer import Tokenizer


@torch.inference_mode()
def window_losses(model, tokens: np.ndarray, token_bytes: torch.Tensor, max_tokens: int | None, batch_size: int,
                  what: str = "the validation split") -> tuple[list[tuple[int, int, float]], int]:
    """(tokens, bytes, summed nats) of each non-overlapping block_size window of `tokens`, in order: all of
    them, or those within the first max_tokens. Also how many windows the split holds. On the model's device
    (token_bytes: there too)."""
    T, device = model.cfg.block_size, token_bytes.device
    if max_tokens is not None and max_tokens < T:
        raise ParamsError(f"evaluate.max_tokens={max_tokens} is less than one window of the model's block_size "
                          f"{T}: raise it, or set it to null to score every window")
    available = (len(tokens) - 1) // T                        # the last window needs one more token: its target
    n_windows = available if max_tokens is None else min(available, max_tokens // T)
    if n_windows == 0:
        raise ParamsError(f"{what} has {len(tokens)} tokens, fewer than one window of block_size+1={T + 1}: "
                          f"raise data.val_fraction or use a bigger corpus")
    offsets = [i * T for i in range(n_windows)]
    windows = []
    for i in range(0, n_windows, batch_size):
        x, y = window_batch(tokens, offsets[i:i + batch_size], T)
        x, y = x.to(device), y.to(device)
        nll = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)  # (B, T)
        windows += zip([T] * len(y), token_bytes[y].sum(1).tolist(), nll.sum(1).tolist())
    return windows, available


def quality(windows: list[tuple[int, int, float]], available: int) -> dict:
    """Loss, perplexity and bits per byte of the scored windows, and the share of the split's windows they are.
    Summed window by window in order, so metrics/windows/<name>.csv's rows reproduce them exactly."""
    n, n_bytes, nll = map(sum, zip(*windows))
    return {"val_loss": nll / n, "val_ppl": math.exp(nll / n), "val_bpb": nll / n_bytes / math.log(2),
            "val_tokens": n, "val_bytes": n_bytes, "val_share": len(windows) / available}


NOT_MEASURED = ("device", "decode_compiled")   # in metrics/<model>.json, not MLflow metrics: a tag and a param


def median_seconds(timed_fn, warmup: int, runs: int) -> float:
    """Median of `runs` calls of timed_fn (which returns the seconds it measured) after `warmup`."""
    for _ in range(warmup):
        timed_fn()
    return statistics.median(timed_fn() for _ in range(runs))


def clock(device: torch.device) -> float:
    """perf_counter once `device` has run what was queued (a GPU runs its kernels later)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


@torch.inference_mode()
def speed(model, prompt: torch.Tensor, decode_tokens: int, warmup: int, runs: int, compile: bool = False) -> dict:
    """Batch-1 tokens/s: prefill of `prompt` (on the model's device), then `decode_tokens` single-token
    cached steps (compile: by the compiled fixed-shape step, its compilation in an untimed first run)."""
    P = prompt.shape[1]
    if P + decode_tokens > model.cfg.block_size:
        raise ParamsError(f"evaluate.prompt_tokens + evaluate.decode_tokens = {P + decode_tokens} exceeds the "
                          f"model's block_size {model.cfg.block_size}: lower them")

    def prefill(cache=None):
        cache = model.new_cache(1, P + decode_tokens) if cache is None else cache
        t0 = clock(prompt.device)
        logits = model(prompt, cache)
        return clock(prompt.device) - t0, logits

    def decode():
        cache, advance = model.decoder(1, P + decode_tokens, compile)
        _, logits = prefill(cache)
        t0 = clock(prompt.device)
        for _ in range(decode_tokens):
            logits = advance(logits[:, -1:].argmax(-1))
        return clock(prompt.device) - t0

    return {"prefill_tokens_per_s": P / median_seconds(lambda: prefill()[0], warmup, runs),
            "decode_tokens_per_s": decode_tokens / median_seconds(decode, warmup + int(compile), runs)}


@torch.inference_mode()
def batch_decode_speed(model, context: torch.Tensor, decode_tokens: int, warmup: int, runs: int,
                       compile: bool = False) -> dict:
    """Batched decode tokens/s: `context` (B, C) prefilled into a cache (not timed), then `decode_tokens` cached
    steps of all B sequences at once, B x decode_tokens tokens over their time. Where batch-1 decode pays
    per-call overheads, this is where keys/values read (GQA/MQA), SSM state and looped applications show."""
    (B, C), device = context.shape, context.device
    if C + decode_tokens > model.cfg.block_size:
        raise ParamsError(f"evaluate.decode_context + evaluate.decode_tokens = {C + decode_tokens} exceeds the "
                          f"model's block_size {model.cfg.block_size}: lower decode_context (null: prompt_tokens) "
                          f"or decode_tokens")

    def decode() -> float:
        cache, advance = model.decoder(B, C + decode_tokens, compile)
        logits = model(context, cache)
        t0 = clock(device)
        for _ in range(decode_tokens):
            logits = advance(logits[:, -1:].argmax(-1))
        return clock(device) - t0

    return {"decode_batch_tokens_per_s": B * decode_tokens / median_seconds(decode, warmup + int(compile), runs)}


def batch_context(val: np.ndarray, batch: int, length: int) -> torch.Tensor:
    """(batch, length) token ids: `batch` windows of the validation split, evenly spaced through it."""
    starts = [i * (len(val) - length) // batch for i in range(batch)]
    return torch.from_numpy(np.stack([np.asarray(val[s:s + length], dtype=np.int64) for s in starts]))


@torch.inference_mode()
def samples(model, tokenizer, val: np.ndarray, prompt_tokens: int, new_tokens: int, n: int = 3) -> str:
    """Greedy continuations of n fixed prompts, evenly spaced through the validation split."""
    out = []
    for i in range(n):
        start = i * (len(val) - prompt_tokens) // n
        prompt = torch.from_numpy(np.asarray(val[start:start + prompt_tokens], dtype=np.int64))[None]
        ids = model.generate(prompt.to(model.wte.weight.device), new_tokens, temperature=0)[0].tolist()
        out.append(f"--- sample {i + 1} (validation tokens {start}..{start + prompt_tokens}) ---\n"
                   f"{tokenizer.decode(ids[:prompt_tokens])}\n>>>\n{tokenizer.decode(ids[prompt_tokens:])}\n")
    return "\n".join(out)


def lm_eval_tasks(ev):
    """lm-eval's TaskManager knowing every name in evaluate.tasks (None when there are none), or one
    ParamsError: lm-eval missing, a task path missing, or a task name it does not know. Indexing lm-eval's
    own ~15k task configs takes seconds, so when evaluate.task_paths hold every task, only they are read."""
    if not ev.tasks:
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ParamsError("evaluate.tasks needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    for path in ev.task_paths:
        if not Path(path).is_dir():
            raise ParamsError(f"evaluate.task_paths: '{path}' is not a directory (of lm-eval task YAMLs)")
    manager = TaskManager(include_path=ev.task_paths, include_defaults=False) if ev.task_paths else None
    if manager is None or set(ev.tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=ev.task_paths or None)
    if unknown := [t for t in ev.tasks if t not in manager.all_tasks]:
        where = f" --include_path {':'.join(ev.task_paths)}" if ev.task_paths else ""
        raise ParamsError(f"evaluate.tasks: {', '.join(repr(t) for t in unknown)} "
                          f"{'is not an lm-eval task' if len(unknown) == 1 else 'are not lm-eval tasks'}: "
                          f"list them with `lm-eval ls tasks{where}`")
    return manager


def lm_eval_scores(model, tokenizer, ev, manager) -> dict:
    """The numeric results of evaluate.tasks, flat: lm_eval.<task>.<metric> (a filter other than
    lm-eval's "none" is appended: lm_eval.<task>.<metric>.<filter>); "N/A" and NaN stderrs are left out."""
    from lm_eval import simple_evaluate

    from components.harness import ArchflowLM

    lm = ArchflowLM(model=model, tokenizer=tokenizer, batch_size=ev.batch_size)
    results = simple_evaluate(model=lm, tasks=list(ev.tasks), task_manager=manager, limit=ev.limit, log_samples=False)
    out = {}
    for task, scores in results["results"].items():
        for key, value in scores.items():
            metric, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"lm_eval.{task}.{metric}" + (f".{kind}" if kind not in ("", "none") else "")] = value
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a model of the study (a directory under models/)")
    args = parser.parse_args(argv)
    study = load_study()
    if args.name not in study.evaluated():
        raise ParamsError(f"unknown model '{args.name}': the study evaluates {', '.join(study.evaluated())}")
    ev = study.evaluate
    if "all" in study.data.domains:
        raise ParamsError("data.domains.all: metrics/windows/<model>.csv names the whole validation split 'all', "
                          "so a domain cannot be called that: rename it")
    device = resolve_device(study.train.accelerator)
    lm_eval_manager = lm_eval_tasks(ev)
    if ev.threads:
        torch.set_num_threads(ev.threads)
    model_dir = study.model_dir(args.name)
    model, meta = load_input(study, args.name, prepared_meta(), f"evaluate@{args.name}", "model")   # its tokenizer's
    model.to(device)
    tokenizer = Tokenizer.load(PREPARED / "tokenizer.json")
    val = load_tokens(PREPARED, "val")

    start = time.perf_counter()                                 # the stage's work: scoring and speeds
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    windows, available = window_losses(model, val, token_bytes, ev.max_tokens, ev.batch_size)
    metrics = quality(windows, available)
    rows = [("all", i, *w) for i, w in enumerate(windows)]
    for domain in study.data.domains:                           # scored alike, over each domain's own val.bin
        windows, available = window_losses(model, load_tokens(PREPARED, f"domains/{domain}/val"), token_bytes,
                                           ev.max_tokens, ev.batch_size, f"domain {domain}'s validation split")
        metrics |= {f"domain.{domain}.{k}": v for k, v in quality(windows, available).items()
                    if k in ("val_loss", "val_bpb", "val_tokens")}
        rows += [(domain, i, *w) for i, w in enumerate(windows)]
    prompt = torch.from_numpy(np.asarray(val[:ev.prompt_tokens], dtype=np.int64))[None].to(device)
    metrics |= speed(model, prompt, ev.decode_tokens, ev.speed_warmup, ev.speed_runs, ev.compile)
    context = batch_context(val, ev.decode_batch, ev.batch_context).to(device)
    metrics |= batch_decode_speed(model, context, ev.decode_tokens, ev.speed_warmup, ev.speed_runs, ev.compile)
    from components.flops import cache_bytes
    metrics |= cache_bytes(model.cfg, model.wte.weight.element_size())   # what generation's cache holds
    metrics |= {"params": model.num_params(), "active_params": model.num_active_params(),
                "size_bytes": (model_dir / "model.safetensors").stat().st_size,
                "train_tokens": meta["tokens_seen"], "device": device_name(device),
                "threads": torch.get_num_threads(), "decode_compiled": ev.compile}
    # what training cost in compute, where the model's stage recorded it (models trained before it did: absent)
    metrics |= {k: meta[k] for k in ("flops_per_token", "train_flops", "total_train_flops") if k in meta}
    if lm_eval_manager is not None:
        metrics |= lm_eval_scores(model, tokenizer, ev, lm_eval_manager)
    work_seconds = time.perf_counter() - start
    # Every scored window's sums, so the report can resample windows (paired across models: the same
    # tokenizer and block_size give the same windows). repr: the floats read back bit for bit.
    table = "".join(f"{split},{i},{n},{n_bytes},{loss!r}\n" for split, i, n, n_bytes, loss in rows)
    write_atomic(Path("metrics/windows") / f"{args.name}.csv", "split,window,tokens,bytes,loss\n" + table)
    write_atomic(Path("metrics") / f"{args.name}.json", dumps(metrics))

    # MLflow mirrors the metrics file exactly (what is not a measurement: the device as a tag, whether decode
    # was compiled as the param evaluate.compile), with the config, lineage and a few samples.
    params = {"model": model.cfg.to_dict(), "evaluate": ev.model_dump()}
    tags = {k: meta[k] for k in ("variant", "method") if k in meta} | {"device": metrics["device"]}
    with tracking.stage_run(study, "evaluate", model=args.name, parents=meta["parents"], params=params,
                            tags=tags) as run_id:
        tracking.log_metrics({k: v for k, v in metrics.items() if k not in NOT_MEASURED})
        tracking.log_model_dir(model_dir, study.tracking.log_models, curve=False)   # the training run has it
        if run_id:
            tracking.mlflow.log_text(samples(model, tokenizer, val, ev.prompt_tokens, ev.decode_tokens), "samples.txt")
        if run_id and study.tracking.register:
            version = tracking.register_model_dir(study, args.name, model_dir, run_id)
            print(f"registered {study.study.name} version {version}, alias {args.name}")
    print(f"evaluate@{args.name}: val_loss {metrics['val_loss']:.4f}, val_bpb {metrics['val_bpb']:.3f}, "
          f"decode {metrics['decode_tokens_per_s']:.0f} tok/s, batch of {ev.decode_batch} "
          f"{metrics['decode_batch_tokens_per_s']:.0f} tok/s" + stage_clock(work_seconds))


if __name__ == "__main__":
    cli(main)
