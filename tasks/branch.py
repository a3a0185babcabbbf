"""branch@<name>: a copy of a pretrained parent, trained further on one data domain (Branch-Train-MiX's
"branch" and "train" steps; BAM's too). upcycle@ (btx, bam) makes one expert of each branch.

    python -m tasks.branch parallel-lib     # what `dvc repro branch@parallel-lib` runs

params.yaml `branch.<name>`: parent (a pretrain variant), domain (a key of data.domains), and
max_steps/lr/min_lr/warmup_steps over `train`. Trains on data/prepared/domains/<domain>/train.bin,
its curve's val_loss is on that domain's val.bin. Writes branches/<parent>/<name>/ (model.safetensors,
config.json, meta.json, curve.csv); branches are not evaluated (they are steps towards an upcycle).
Resumable and DDP-safe like pretrain: checkpoints in checkpoints/<name>/, only rank 0 writes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as L
import pandas as pd
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from components import tracking
from components.artifacts import load_model_dir, save_model_dir, short_hash
from components.data import load_tokens
from components.lit import LitLM, LMDataModule, TrainingCurve, make_trainer, resume_step
from components.errors import ParamsError, cli
from components.params import load_study

PREPARED = Path("data/prepared")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the branch section of params.yaml")
    args = parser.parse_args(argv)
    study = load_study()
    if args.name not in study.branch:
        raise ParamsError(f"unknown branch '{args.name}': the branch section has {', '.join(study.branch) or '(none)'}")
    entry = study.branch[args.name]
    data_meta = prepared_meta(entry.domain)
    model, parent_meta = load_parent(study, entry.parent, data_meta)
    cfg, train, seed = model.cfg, study.stage_train(entry), study.study.seed
    data_seed = int(short_hash({"seed": seed, "branch": args.name}), 16) % 2**31   # not the parent's batches
    params_hash = short_hash({"stage": "branch", "parent": parent_meta["params_hash"], "model": cfg.to_dict(),
                              "train": train.model_dump(), "seed": data_seed, "domain": entry.domain,
                              "data": data_meta["sha256"]})

    # 1. Resume from a checkpoint of the same inputs, if an earlier run was interrupted.
    ckpt_dir = Path("checkpoints") / args.name
    start_step = resume_step(ckpt_dir / "last.ckpt", params_hash)

    # 2. The parent's copy, the domain's batches (by (data_seed, step)) and the curve on its val split.
    L.seed_everything(seed, verbose=False)
    lit = LitLM(cfg, train, params_hash, model=model.train())
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, data_seed,
                        split=f"domains/{entry.domain}/train")
    curve = TrainingCurve(load_tokens(PREPARED, f"domains/{entry.domain}/val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)
    curve.rows = [{"step": 0, "tokens": 0, "train_loss": math.nan, "val_loss": curve.val_loss(model),
                   "lr": 0.0, "tokens_per_s": math.nan}]        # the parent, on this domain

    # 3. Train; only rank 0 tracks (DDP runs this file once per rank).
    rank0 = rank_zero_only.rank == 0
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "branch": {args.name: entry.model_dump()}}
    run = tracking.stage_run(study, "branch", model=args.name, parents=[entry.parent], params=params,
                             tags={"domain": entry.domain}) if rank0 else contextlib.nullcontext()
    with run as run_id:
        logger = MLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=run_id) if run_id else False
        if train.max_steps:                                  # 0: the parent's copy as it is
            trainer = make_trainer(train, ckpt_dir, [curve], logger)
            trainer.fit(lit, datamodule=data, ckpt_path=ckpt_dir / "last.ckpt" if start_step else None)
        if not rank0:
            return

        # 4. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        tokens = train.max_steps * train.batch_size * cfg.block_size
        meta = {"stage": "branch", "parents": [entry.parent], "domain": entry.domain,
                "data_sha256": data_meta["sha256"], "params_hash": params_hash,
                "tokens_seen": parent_meta["tokens_seen"] + tokens, "steps": train.max_steps,
                "train_seconds": round(curve.seconds, 3), "params": lit.model.num_params()}
        out = study.model_dir(args.name)
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": pd.DataFrame(curve.rows).to_csv(index=False)})
        final = curve.rows[-1]
        tracking.log_metrics({"final_val_loss": final["val_loss"], "train_seconds": curve.seconds,
                              "tokens_seen": meta["tokens_seen"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"branch@{args.name}: {entry.parent} + {tokens:,} tokens of {entry.domain} in {curve.seconds:.1f} s, "
          f"{entry.domain} val_loss {curve.rows[0]['val_loss']:.4f} -> {final['val_loss']:.4f}")


def prepared_meta(domain: str) -> dict:
    """data/prepared/meta.json, once the domain's token files are known to be there."""
    if not (PREPARED / "meta.json").exists():
        raise ParamsError(f"{PREPARED} is missing: run `dvc repro prepare` first")
    data_meta = json.loads((PREPARED / "meta.json").read_text())
    if domain not in data_meta.get("domains", {}):
        raise ParamsError(f"{PREPARED} has no domain '{domain}' (it has {', '.join(data_meta.get('domains', {}))}): "
                          f"data was prepared before data.domains.{domain} was added; run `dvc repro prepare`")
    return data_meta


def load_parent(study, parent: str, data_meta: dict):
    """(the parent model, its meta), checked to be built on the data prepared now."""
    path = study.model_dir(parent)
    if not (path / "model.safetensors").exists():
        raise ParamsError(f"the parent model '{parent}' is not built ({path} has no model): "
                          f"run `dvc repro pretrain@{parent}` first")
    model, meta = load_model_dir(path)
    if meta["data_sha256"] != data_meta["sha256"]:
        raise ParamsError(f"the parent model '{parent}' was trained on other prepared data (another corpus or "
                          f"tokenizer): rebuild it with `dvc repro pretrain@{parent}`")
    return model, meta


if __name__ == "__main__":
    cli(main)
