"""pretrain@<variant>: train one variant of params.yaml from scratch on data/prepared.

    python -m tasks.pretrain parallel       # what `dvc repro pretrain@parallel` runs

Writes models/<variant>/ (model.safetensors, config.json, meta.json, curve.csv: the same bytes
whenever the inputs are), then its training time to metrics/train/<variant>.json. Resumable:
an interrupted run leaves checkpoints/<variant>/last.ckpt (outside DVC outs) and the next run
continues from it to the same weights. Safe to relaunch: DDP re-executes this command on
every rank, and only global rank 0 writes outputs or talks to MLflow. On several nodes
(train.num_nodes > 1) torchrun or srun starts it on each: docs/multinode.md.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from components import tracking
from components.artifacts import PREPARED, dumps, prepared_meta, save_model_dir, short_hash
from components.data import load_tokens
from components.device import global_rank0
from components.errors import cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta
from components.lit import LitLM, LMDataModule, TrainingCurve, check_launcher, fit, seed_everything
from components.params import load_study


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of pretrain.variants in params.yaml, or <key>-s<seed> for a replicate seed")
    args = parser.parse_args(argv)
    study = load_study()
    variant, seed = (m := study.find_model(args.name, "pretrain"))["entry"], m["seed"]
    data_meta = prepared_meta()
    cfg = study.variant_config(variant, vocab_size=data_meta["vocab_size"])
    train = study.train
    check_launcher(train)          # num_nodes > 1: torchrun or srun started this on every node
    params_hash = short_hash({"model": cfg.to_dict(), "train": train.model_dump(), "seed": seed,
                              "data": data_meta["sha256"]})

    # 1. Model, data and the curve: all determined by (seed, step). A new model's curve starts at
    #    step eval_every (its step-0 loss is that of a random init).
    seed_everything(seed, verbose=False)
    lit = LitLM(cfg, train, params_hash)
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, seed)
    curve = TrainingCurve(load_tokens(PREPARED, "val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)

    # 2. Train, resuming an interrupted run of the same inputs; only global rank 0 tracks and writes.
    ckpt_dir = Path("checkpoints") / args.name
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "pretrain": {"variants": {variant: study.pretrain.variants[variant].model_dump(exclude_none=True)}}}
    with tracking.stage_run(study, "pretrain", model=args.name, params=params, enabled=global_rank0(),
                            tags={"variant": variant, "params_hash": params_hash}) as run_id:
        if not fit(lit, data, curve, train, ckpt_dir, params_hash, tracking.lightning_logger(run_id)):
            return

        # 3. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last, so a
        #    tracking failure here costs a rerun that resumes from it, not the training.
        tokens = train.max_steps * train.batch_size * cfg.block_size
        meta = {"stage": "pretrain", "variant": variant, "seed": seed, "parents": [], "data_sha256": data_meta["sha256"],
                "params_hash": params_hash, "tokens_seen": tokens, "steps": train.max_steps,
                "params": lit.model.num_params(), **flops_meta(lit.model, tokens, inherited=0)}
        out = study.model_dir(args.name)
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": curve.csv()})
        write_atomic(study.train_metrics(args.name), dumps(curve.timing()))
        final = curve.rows[-1]
        tracking.log_metrics({"final_val_loss": final["val_loss"], "final_train_loss": final["train_loss"],
                              "train_seconds": curve.seconds, "tokens_seen": tokens})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"pretrain@{args.name}: {meta['params']:,} params, {tokens:,} tokens in {curve.seconds:.1f} s, "
          f"val_loss {final['val_loss']:.4f}" + stage_clock(curve.fit_seconds))


if __name__ == "__main__":
    cli(main)
