"""branch@<name>: a copy of a pretrained parent, trained further on one data domain (Branch-Train-MiX's
"branch" and "train" steps; BAM's too). upcycle@ (btx, bam) makes one expert of each branch.

    python -m tasks.branch parallel-lib     # what `dvc repro branch@parallel-lib` runs

params.yaml `branch.<name>`: parent (a pretrain variant), domain (a key of data.domains), and
max_steps/lr/min_lr/warmup_steps over `train`. Trains on data/prepared/domains/<domain>/train.bin,
its curve's val_loss is on that domain's val.bin. Writes branches/<parent>/<name>/ (model.safetensors,
config.json, meta.json, curve.csv) and metrics/train/<name>.json (its training time); branches are not
evaluated (they are steps towards an upcycle).
Resumable and DDP-safe like pretrain: checkpoints in checkpoints/<name>/, only rank 0 writes.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from components import tracking
from components.artifacts import PREPARED, dumps, load_input, prepared_meta, save_model_dir, short_hash
from components.data import load_tokens
from components.device import global_rank0
from components.errors import cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta, inherited_flops
from components.lit import LitLM, LMDataModule, TrainingCurve, fit, seed_everything
from components.params import load_study


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the branch section of params.yaml, or <key>-s<seed> for a replicate seed")
    args = parser.parse_args(argv)
    study = load_study()
    m = study.find_model(args.name, "branch")
    entry, parent, seed = study.branch[m["entry"]], m["parents"][0], m["seed"]   # the parent's model of this seed
    data_meta = prepared_meta(entry.domain)
    model, parent_meta = load_input(study, parent, data_meta, f"branch.{m['entry']}.parent", "parent")
    cfg, train = model.cfg, study.stage_train(entry)
    data_seed = int(short_hash({"seed": seed, "branch": m["entry"]}), 16) % 2**31   # not the parent's batches
    params_hash = short_hash({"stage": "branch", "parent": parent_meta["params_hash"], "model": cfg.to_dict(),
                              "train": train.model_dump(), "seed": data_seed, "domain": entry.domain,
                              "data": data_meta["sha256"]})

    # 1. The parent's copy, the domain's batches (by (data_seed, step)) and the curve on its val split,
    #    from step 0: the parent's loss on this domain.
    seed_everything(seed, verbose=False)
    lit = LitLM(cfg, train, params_hash, model=model.train())
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, data_seed, split=f"domains/{entry.domain}/train")
    curve = TrainingCurve(load_tokens(PREPARED, f"domains/{entry.domain}/val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)
    curve.start(curve.val_loss(model))

    # 2. Train (max_steps 0: the parent's copy as it is), resumable; only global rank 0 tracks and writes.
    ckpt_dir = Path("checkpoints") / args.name
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "branch": {m["entry"]: entry.model_dump()}}
    with tracking.stage_run(study, "branch", model=args.name, parents=[parent], params=params,
                            tags={"domain": entry.domain}, enabled=global_rank0()) as run_id:
        if not fit(lit, data, curve, train, ckpt_dir, params_hash, tracking.lightning_logger(run_id)):
            return

        # 3. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        tokens = train.max_steps * train.batch_size * cfg.block_size
        meta = {"stage": "branch", "entry": m["entry"], "seed": seed, "parents": [parent], "domain": entry.domain,
                "data_sha256": data_meta["sha256"], "params_hash": params_hash,
                "tokens_seen": parent_meta["tokens_seen"] + tokens, "steps": train.max_steps,
                "params": lit.model.num_params(), **flops_meta(lit.model, tokens, inherited_flops([parent_meta]))}
        out = study.model_dir(args.name)
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": curve.csv()})
        write_atomic(study.train_metrics(args.name), dumps(curve.timing()))
        final = curve.rows[-1]
        tracking.log_metrics({"final_val_loss": final["val_loss"], "train_seconds": curve.seconds,
                              "tokens_seen": meta["tokens_seen"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"branch@{args.name}: {parent} + {tokens:,} tokens of {entry.domain} in {curve.seconds:.1f} s, "
          f"{entry.domain} val_loss {curve.rows[0]['val_loss']:.4f} -> {final['val_loss']:.4f}" + stage_clock(curve.fit_seconds))


if __name__ == "__main__":
    cli(main)
