"""distill@<name>: train a student on a frozen teacher's outputs (Hinton KD) and the data.

    python -m tasks.distill kd-small        # what `dvc repro distill@kd-small` runs

The teacher is any model of the study (its model directory, checked to be built on the data
prepared now, used as `logits = teacher(x)`). The student is built from scratch (`init: scratch`: a
preset and overrides of `model`, like a pretrain variant) or from every other layer of the teacher
(`init: teacher-every-other`). Writes models/<name>/ (model.safetensors, config.json, meta.json with
stage distill, method kd | kd-reverse [+hidden], parents [teacher], curve.csv: from step 0 when the
student starts from the teacher's layers), then metrics/train/<name>.json (its training time).
Resumable like pretrain (checkpoints/<name>/); only global rank 0 writes outputs or talks to MLflow.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from components import tracking
from components.artifacts import PREPARED, dumps, load_input, prepared_meta, save_model_dir, short_hash
from components.data import load_tokens
from components.distill import LitDistill, init_from_teacher, method_name
from components.device import global_rank0
from components.errors import ParamsError, cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta, inherited_flops
from components.lit import LMDataModule, TrainingCurve, fit, seed_everything
from components.model import TransformerLM
from components.params import load_study, teacher_init_problems


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the distill section of params.yaml, or <key>-s<seed> for a replicate seed")
    args = parser.parse_args(argv)
    study = load_study()
    m = study.find_model(args.name, "distill")
    name, teacher_name, seed = m["entry"], m["parents"][0], m["seed"]   # the teacher's model of this seed
    entry = study.distill[name]
    data_meta = prepared_meta()
    teacher, teacher_meta = load_input(study, teacher_name, data_meta, f"distill.{name}.teacher", "teacher")
    if entry.init == "teacher-every-other":
        if problems := teacher_init_problems(teacher.cfg, study.student_overrides(name)):
            raise ParamsError("\n".join(f"distill.{name}.{p} (teacher '{teacher_name}')" for p in problems))
    cfg = study.student_config(name, teacher.cfg)
    train, method = study.stage_train(entry), method_name(entry.reverse, entry.hidden_weight)
    params_hash = short_hash({"model": cfg.to_dict(), "train": train.model_dump(), "seed": seed,
                              "data": data_meta["sha256"], "teacher": teacher_meta["params_hash"],
                              "distill": entry.model_dump()})

    # 1. Student, data and the curve: all determined by (seed, step). The curve starts at step 0 (the
    #    student as initialised) when the student starts from its teacher's layers or trains no steps.
    seed_everything(seed, verbose=False)
    student = TransformerLM(cfg)
    if entry.init == "teacher-every-other":
        init_from_teacher(student, teacher)
    lit = LitDistill(student, teacher, train, params_hash, alpha=entry.alpha, temperature=entry.temperature,
                     reverse=entry.reverse, hidden_weight=entry.hidden_weight)
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, seed)
    curve = TrainingCurve(load_tokens(PREPARED, "val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)
    if entry.init == "teacher-every-other" or not train.max_steps:
        curve.start(curve.val_loss(student))

    # 2. Train (max_steps 0: the student as initialised), resumable; only global rank 0 tracks and writes.
    ckpt_dir = Path("checkpoints") / args.name
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "distill": {name: entry.model_dump(exclude_none=True)}}
    with tracking.stage_run(study, "distill", model=args.name, parents=[teacher_name], params=params,
                            tags={"method": method, "teacher": teacher_name, "init": entry.init},
                            enabled=global_rank0()) as run_id:
        if not fit(lit, data, curve, train, ckpt_dir, params_hash, tracking.lightning_logger(run_id)):
            return

        # 3. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        tokens = train.max_steps * train.batch_size * cfg.block_size
        inherited = teacher_meta["tokens_seen"] if entry.init == "teacher-every-other" else 0
        meta = {"stage": "distill", "entry": name, "seed": seed, "method": method, "parents": [teacher_name],
                "teacher": teacher_name,
                "init": entry.init, "alpha": entry.alpha, "temperature": entry.temperature, "reverse": entry.reverse,
                "hidden_weight": entry.hidden_weight, "data_sha256": data_meta["sha256"], "params_hash": params_hash,
                "tokens_seen": inherited + tokens, "teacher_tokens_seen": teacher_meta["tokens_seen"],
                "steps": train.max_steps, "params": student.num_params(), "teacher_params": teacher.num_params(),
                **flops_meta(student, tokens, inherited_flops([teacher_meta]), teacher=teacher)}   # + teacher forwards
        out = study.model_dir(args.name)
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": curve.csv()})
        write_atomic(study.train_metrics(args.name), dumps(curve.timing()))
        final = curve.rows[-1]
        tracking.log_metrics({"final_val_loss": final["val_loss"], "final_train_loss": final["train_loss"],
                              "train_seconds": curve.seconds, "tokens_seen": meta["tokens_seen"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"distill@{args.name} ({method} from {teacher_name}): {meta['params']:,} params "
          f"(teacher {meta['teacher_params']:,}), {tokens:,} tokens in {curve.seconds:.1f} s, "
          f"val_loss {final['val_loss']:.4f}" + stage_clock(curve.fit_seconds))


if __name__ == "__main__":
    cli(main)
