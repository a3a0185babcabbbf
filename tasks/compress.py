"""compress@<name>: a smaller or cheaper copy of any model of the study: int8 weights, structured
pruning, attention removal or FFN Fusion (components/compress.py), or the model itself (identity: the
control for the recovery); then, for every method but int8, `max_steps` steps of recovery: continued
training or distillation from the source (max_steps 0: none, the before-recovery model).

    python -m tasks.compress serial-int8       # what `dvc repro compress@serial-int8` runs

Writes models/<name>/ (model.safetensors, config.json, meta.json; for all but int8, even with
max_steps 0, curve.csv: a step-0 row for the compressed model, then the recovery's rows), then
metrics/train/<name>.json (the transform's and the recovery's time). meta.json records the
method's settings, the validation loss of the source, of the compressed model, and after
recovery, and the FLOPs (components/flops.py; a distilled recovery pays the source's forwards).
Calibration batches (importance scores, the searches) come from the training split, drawn with
seed + 1. Resumable and DDP-safe like pretrain: only global rank 0 writes outputs or talks to MLflow.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

from components import tracking
from components.artifacts import PREPARED, dumps, load_input, prepared_meta, save_model_dir, short_hash
from components.compress import (FUSIONS, drop_attention, importance, keep_by_score, mean_loss, prune, quantize,
                                  search_drops, search_runs)
from components.data import StepBatches, load_tokens
from components.device import global_rank0
from components.errors import ParamsError, cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta, inherited_flops
from components.curve import Curve
from components.params import AttentionDrop, FfnFusion, Identity, Int8, Prune, Recovery, load_study
from components.quant import int8_path


def compress(entry, source, batches: StepBatches) -> tuple:
    """(the compressed model, the method's settings for meta.json). batches[s]: calibration batch s."""
    match entry:
        case Int8():
            return quantize(source, entry.embeddings), {"embeddings": entry.embeddings, "int8_path": int8_path()}
        case Prune():
            calib = [batches[s] for s in range(entry.calib_batches)]
            model = prune(source, *keep_by_score(importance(source, entry.criterion, calib), entry.fraction))
            return model, {"fraction": entry.fraction, "criterion": entry.criterion,
                           "layer_n_head": model.cfg.layer_n_head, "layer_n_kv_head": model.cfg.layer_n_kv_head,
                           "layer_d_ff": model.cfg.layer_d_ff}
        case AttentionDrop():
            calib = [batches[s] for s in range(entry.calib_batches)]
            layers, searched = (sorted(entry.layers), []) if entry.layers else \
                search_drops(source, calib, entry.max_loss_increase)
            model = drop_attention(source, layers)
            return model, {"layers": layers, "searched": searched,
                           "calib_loss_increase": round(mean_loss(model, calib) - mean_loss(source, calib), 6)}
        case FfnFusion():
            calib = [batches[s] for s in range(entry.calib_batches)]
            runs, searched = ([tuple(r) for r in entry.runs], []) if entry.runs else \
                search_runs(source, calib, entry.max_loss_increase, entry.mode)
            model = FUSIONS[entry.mode](source, runs)
            return model, {"mode": entry.mode, "runs": [list(r) for r in runs], "searched": searched,
                           "depth_removed": sum(b - a for a, b in runs),   # sequential steps (mode ffn: layers)
                           "calib_loss_increase": round(mean_loss(model, calib) - mean_loss(source, calib), 6)}
        case Identity():                         # a copy: recovery must not train the source, its teacher
            return copy.deepcopy(source), {}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the compress section of params.yaml, or <key>-s<seed> for a replicate seed")
    args = parser.parse_args(argv)
    study = load_study()
    m = study.find_model(args.name, "compress")
    name, source_name, seed = m["entry"], m["parents"][0], m["seed"]   # the source's model of this seed
    entry = study.compress[name]
    data_meta = prepared_meta()
    source, src_meta = load_input(study, source_name, data_meta, f"compress.{name}.source", "source")
    src_size = (study.model_dir(source_name) / "model.safetensors").stat().st_size
    if problems := entry.source_problems(source.cfg):
        raise ParamsError("\n".join(f"compress.{name}: {p}" for p in problems))
    train = study.stage_train(entry)                           # int8: max_steps 0
    block_size = source.cfg.block_size
    params_hash = short_hash({"source": src_meta["params_hash"], "compress": entry.model_dump(),
                              "train": train.model_dump(), "seed": seed, "data": data_meta["sha256"]})

    # Lightning only where the stage trains (its import is most of a stage's start-up): int8 and
    # max_steps 0 compute, evaluate and write without it
    if train.max_steps:
        from components.distill import LitDistill
        from components.lit import LitLM, LMDataModule, TrainingCurve, fit, seed_everything
        seed_everything(seed, verbose=False)

    # 1. The transform (deterministic, no global RNG: every DDP rank computes the same model). A method
    #    that recovers (even max_steps 0) has a curve, from step 0: the compressed model; int8 never
    #    trains, so has none.
    t0 = time.perf_counter()
    calib = StepBatches(load_tokens(PREPARED, "train"), block_size, train.batch_size, seed + 1)
    model, settings = compress(entry, source, calib)
    curve = (TrainingCurve if train.max_steps else Curve)(load_tokens(PREPARED, "val"), block_size, train.batch_size,
                                                          train.eval_batches, train.eval_every, train.max_steps)
    settings |= {"val_loss_source": curve.val_loss(source), "val_loss_compressed": curve.val_loss(model)}
    compress_seconds = round(time.perf_counter() - t0, 3)
    if isinstance(entry, Recovery):
        curve.start(settings["val_loss_compressed"])

    # 2. Recovery (max_steps steps), resumable; only global rank 0 tracks and writes.
    ckpt_dir = Path("checkpoints") / args.name
    params = {"model": model.cfg.to_dict(), "train": train.model_dump(), "compress": entry.model_dump(),
              "study": {"seed": seed}}
    with tracking.stage_run(study, "compress", model=args.name, parents=[source_name], params=params,
                            tags={"method": entry.method}, enabled=global_rank0()) as run_id:
        if train.max_steps:
            model.train()                           # load_model_dir and the transforms leave eval mode
            lit = (LitDistill(model, source, train, params_hash, alpha=entry.alpha, temperature=entry.temperature)
                   if entry.recover == "distill" else LitLM(model.cfg, train, params_hash, model=model))
            data = LMDataModule(PREPARED, block_size, train.batch_size, seed)
            if not fit(lit, data, curve, train, ckpt_dir, params_hash, tracking.lightning_logger(run_id)):
                return
            model = lit.model.cpu().eval()
            settings |= {"recover": entry.recover, "val_loss_recovered": curve.rows[-1]["val_loss"]}

        # 3. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        tokens = train.max_steps * train.batch_size * block_size
        teacher = source if getattr(entry, "recover", None) == "distill" else None    # its forwards count
        meta = {"stage": "compress", "entry": name, "seed": seed, "method": entry.method, "parents": [source_name],
                "data_sha256": data_meta["sha256"], "params_hash": params_hash,
                "tokens_seen": src_meta["tokens_seen"] + tokens, "steps": train.max_steps,
                "params": model.num_params(), "source_params": source.num_params(), **settings,
                **flops_meta(model, tokens, inherited_flops([src_meta]), teacher)}
        out = study.model_dir(args.name)
        save_model_dir(out, model, meta, {"curve.csv": curve.csv()} if curve.rows else {})
        write_atomic(study.train_metrics(args.name), dumps(curve.timing() | {"compress_seconds": compress_seconds}))
        size_ratio = (out / "model.safetensors").stat().st_size / src_size
        tracking.log_metrics({k: v for k, v in settings.items() if k.startswith("val_loss")} |
                             {"size_ratio": size_ratio, "params_ratio": meta["params"] / meta["source_params"],
                              "train_seconds": curve.seconds, "tokens_seen": meta["tokens_seen"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    final = settings.get("val_loss_recovered", settings["val_loss_compressed"])
    print(f"compress@{args.name} ({entry.method} of {source_name}): {meta['params']:,} params "
          f"({meta['params'] / meta['source_params']:.2f}x), {size_ratio:.2f}x the size; val_loss "
          f"{settings['val_loss_source']:.4f} -> {settings['val_loss_compressed']:.4f}"
          + (f" -> {final:.4f} after {train.max_steps} {entry.recover} steps" if train.max_steps else "")
          + stage_clock(compress_seconds + curve.fit_seconds))


if __name__ == "__main__":
    cli(main)
