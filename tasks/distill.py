"""distill@<name>: train a student on a frozen teacher's outputs (Hinton KD) and the data.

    python -m tasks.distill kd-small        # what `dvc repro distill@kd-small` runs

The teacher is any model of the study (models/<teacher>, loaded with load_model_dir and used as
`logits = teacher(x)`). The student is built from scratch (`init: scratch`: a preset and overrides
of `model`, like a pretrain variant) or from every other layer of the teacher (`init:
teacher-every-other`). Writes models/<name>/ (model.safetensors, config.json, meta.json with
stage distill, method kd | kd-reverse [+hidden], parents [teacher], curve.csv). Resumable like
pretrain (checkpoints/<name>/); only global rank 0 writes outputs or talks to MLflow.
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
from components.config import ModelConfig
from components.data import load_tokens
from components.distill import LitDistill, init_from_teacher, method_name
from components.lit import LMDataModule, TrainingCurve, make_trainer, resume_step
from components.model import TransformerLM
from components.errors import ParamsError, cli
from components.params import load_study, teacher_init_problems

PREPARED = Path("data/prepared")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the distill section of params.yaml")
    args = parser.parse_args(argv)
    study = load_study()
    if args.name not in study.distill:
        raise ParamsError(f"unknown distill entry '{args.name}': the distill section has "
                          f"{', '.join(study.distill) or '(none)'}")
    entry = study.distill[args.name]
    data_meta, teacher_dir, teacher_cfg, teacher_meta = inputs(study, args.name)
    cfg = study.student_config(args.name, teacher_cfg)
    train, seed, method = study.stage_train(entry), study.study.seed, method_name(entry.reverse, entry.hidden_weight)
    params_hash = short_hash({"model": cfg.to_dict(), "train": train.model_dump(), "seed": seed,
                              "data": data_meta["sha256"], "teacher": teacher_meta["params_hash"],
                              "distill": entry.model_dump()})

    # 1. Resume from a checkpoint of the same inputs, if an earlier run was interrupted.
    ckpt_dir = Path("checkpoints") / args.name
    start_step = resume_step(ckpt_dir / "last.ckpt", params_hash)

    # 2. Teacher, student, data and the curve: all determined by (seed, step).
    teacher, _ = load_model_dir(teacher_dir)
    L.seed_everything(seed, verbose=False)
    student = TransformerLM(cfg)
    if entry.init == "teacher-every-other":
        init_from_teacher(student, teacher)
    lit = LitDistill(student, teacher, train, params_hash, alpha=entry.alpha, temperature=entry.temperature,
                     reverse=entry.reverse, hidden_weight=entry.hidden_weight)
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, seed)
    curve = TrainingCurve(load_tokens(PREPARED, "val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)

    # 3. Train (max_steps 0: the student as initialised); only rank 0 tracks.
    rank0 = rank_zero_only.rank == 0
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "distill": {args.name: entry.model_dump(exclude_none=True)}}
    run = tracking.stage_run(study, "distill", model=args.name, parents=[entry.teacher], params=params,
                             tags={"method": method, "teacher": entry.teacher, "init": entry.init}) \
        if rank0 else contextlib.nullcontext()
    with run as run_id:
        if train.max_steps:
            logger = MLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=run_id) if run_id else False
            trainer = make_trainer(train, ckpt_dir, [curve], logger)
            trainer.fit(lit, datamodule=data, ckpt_path=ckpt_dir / "last.ckpt" if start_step else None)
            if not trainer.is_global_zero:
                return
        else:
            curve.rows.append({"step": 0, "tokens": 0, "train_loss": math.nan, "val_loss": curve.val_loss(student),
                               "lr": 0.0, "tokens_per_s": math.nan})

        # 4. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        tokens = train.max_steps * train.batch_size * cfg.block_size
        inherited = teacher_meta["tokens_seen"] if entry.init == "teacher-every-other" else 0
        meta = {"stage": "distill", "method": method, "parents": [entry.teacher], "teacher": entry.teacher,
                "init": entry.init, "alpha": entry.alpha, "temperature": entry.temperature, "reverse": entry.reverse,
                "hidden_weight": entry.hidden_weight, "data_sha256": data_meta["sha256"], "params_hash": params_hash,
                "tokens_seen": inherited + tokens, "teacher_tokens_seen": teacher_meta["tokens_seen"],
                "steps": train.max_steps, "train_seconds": round(curve.seconds, 3),
                "params": student.num_params(), "teacher_params": teacher.num_params()}
        out = Path("models") / args.name
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": pd.DataFrame(curve.rows).to_csv(index=False)})
        final = curve.rows[-1]
        tracking.log_metrics({"final_val_loss": final["val_loss"], "final_train_loss": final["train_loss"],
                              "train_seconds": curve.seconds, "tokens_seen": meta["tokens_seen"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"distill@{args.name} ({method} from {entry.teacher}): {meta['params']:,} params "
          f"(teacher {meta['teacher_params']:,}), {tokens:,} tokens in {curve.seconds:.1f} s, "
          f"val_loss {final['val_loss']:.4f}")


def inputs(study, name: str) -> tuple[dict, Path, ModelConfig, dict]:
    """(data meta, teacher dir, teacher config, teacher meta), after every on-disk check that can fail
    before anything is built: prepared data and teacher present, same vocabulary and data, student shape."""
    entry = study.distill[name]
    if not (PREPARED / "meta.json").exists():
        raise ParamsError(f"{PREPARED} is missing: run `dvc repro prepare` first")
    data_meta = json.loads((PREPARED / "meta.json").read_text())
    teacher_dir = study.model_dir(entry.teacher)
    if not (teacher_dir / "model.safetensors").exists():
        stage = study.models()[entry.teacher]["stage"]
        raise ParamsError(f"distill.{name}.teacher: the teacher '{entry.teacher}' is not built ({teacher_dir} is "
                          f"missing): run `dvc repro {stage}@{entry.teacher}` first")
    teacher_cfg = ModelConfig.from_dict(json.loads((teacher_dir / "config.json").read_text()))
    teacher_meta = json.loads((teacher_dir / "meta.json").read_text())
    if teacher_cfg.vocab_size != data_meta["vocab_size"]:
        raise ParamsError(f"distill.{name}.teacher: '{entry.teacher}' has vocab_size {teacher_cfg.vocab_size} but "
                          f"{PREPARED} has {data_meta['vocab_size']}: teacher and student must share a tokenizer; "
                          f"rebuild the teacher on this data (dvc repro) or pick another teacher")
    if teacher_meta.get("data_sha256", data_meta["sha256"]) != data_meta["sha256"]:
        raise ParamsError(f"distill.{name}.teacher: '{entry.teacher}' was trained on other prepared data "
                          f"(data_sha256 {teacher_meta['data_sha256'][:12]} vs {data_meta['sha256'][:12]}), so its "
                          f"token ids may mean other text: rebuild it with `dvc repro`")
    if entry.init == "teacher-every-other":
        problems = teacher_init_problems(teacher_cfg, study.student_overrides(name))
        if problems:
            raise ParamsError("\n".join(f"distill.{name}.{p} (teacher '{entry.teacher}')" for p in problems))
    return data_meta, teacher_dir, teacher_cfg, teacher_meta


if __name__ == "__main__":
    cli(main)
