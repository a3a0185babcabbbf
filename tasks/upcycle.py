"""upcycle@<name>: a dense parent (and its branches) made into a model, then trained further on the
mixed data (the "mix" phase): `continue` (the dense control), `sparse`, `btx` or `bam`.

    python -m tasks.upcycle parallel-bam    # what `dvc repro upcycle@parallel-bam` runs

params.yaml `upcycle.<name>`: parent, method, the method's settings (its class in components/params.py)
and max_steps/lr/min_lr/warmup_steps over `train`. The transform is components/upcycle.py; the
training is pretrain's, starting from the transformed model, with one extra curve row at step 0
(the val loss right after the transform). The mix-phase batches are drawn from a seed of
(seed, parent): every method of a parent's model sees the same batches, none of the parent's.
Writes models/<name>/; meta.json records method, parents, experts (the model each expert comes
from) and extra_tokens (tokens trained beyond the parent: its branches' and this stage's). The
training time goes to metrics/train/<name>.json (the report adds the branches' to btx/bam's).
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from components import tracking
from components.artifacts import (PREPARED, dumps, input_problems, load_model_dir, prepared_meta, read_json,
                                  save_model_dir, short_hash)
from components.data import load_tokens
from components.device import global_rank0
from components.errors import ParamsError, cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta, inherited_flops
from components.lit import LitLM, LMDataModule, TrainingCurve, fit, seed_everything
from components.model import TransformerLM
from components.params import Bam, Btx, Continue, Sparse, StageTrainParams, load_study, upcycle_parent_problems
from components.upcycle import upcycle_state_dict


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a key of the upcycle section of params.yaml, or <key>-s<seed> for a replicate seed")
    args = parser.parse_args(argv)
    study = load_study()
    m = study.find_model(args.name, "upcycle")
    parents, seed = m["parents"], m["seed"]
    # the entry as this seed's model reads it: made from the parent's model of the same seed
    entry = study.upcycle[m["entry"]].model_copy(update={"parent": parents[0]})
    data_meta = prepared_meta()
    sources = load_sources(study, m["entry"], parents, data_meta)    # name -> (model, meta), checked alike
    if problems := upcycle_parent_problems(study, m["entry"], sources[entry.parent][0].cfg):   # imports: first here
        raise ParamsError("\n".join(problems))
    experts = entry.experts(study.branch_models(entry.parent, seed))   # the model each expert comes from
    model = transform(entry, sources, experts, seed)
    cfg, train = model.cfg, study.stage_train(entry)
    data_seed = int(short_hash({"seed": seed, "mix": entry.parent}), 16) % 2**31
    params_hash = short_hash({"stage": "upcycle", "sources": {n: m["params_hash"] for n, (_, m) in sources.items()},
                              "model": cfg.to_dict(), "upcycle": entry.model_dump(), "train": train.model_dump(),
                              "seed": seed, "data_seed": data_seed, "data": data_meta["sha256"]})

    # 1. The transformed model, the mixed data's batches and the curve, from step 0: the transform's loss.
    seed_everything(seed, verbose=False)
    lit = LitLM(cfg, train, params_hash, model=model.train())
    data = LMDataModule(PREPARED, cfg.block_size, train.batch_size, data_seed)
    curve = TrainingCurve(load_tokens(PREPARED, "val"), cfg.block_size, train.batch_size,
                          train.eval_batches, train.eval_every, train.max_steps)
    curve.start(curve.val_loss(model))

    # 2. Train (the mix phase; max_steps 0: the transformed model as it is), resumable; only global
    #    rank 0 tracks and writes.
    ckpt_dir = Path("checkpoints") / args.name
    params = {"model": cfg.to_dict(), "train": train.model_dump(), "study": {"seed": seed},
              "upcycle": {m["entry"]: entry.model_dump()}}
    with tracking.stage_run(study, "upcycle", model=args.name, parents=parents, params=params,
                            tags={"method": entry.method}, enabled=global_rank0()) as run_id:
        if not fit(lit, data, curve, train, ckpt_dir, params_hash, tracking.lightning_logger(run_id)):
            return

        # 3. Outputs first (DVC's), then MLflow mirrors them; the checkpoint goes last.
        meta = {"entry": m["entry"], "seed": seed} | upcycle_meta(entry, parents, experts, sources, data_meta,
                                                                 params_hash, train, cfg, lit.model)
        out = study.model_dir(args.name)
        save_model_dir(out, lit.model.cpu(), meta, {"curve.csv": curve.csv()})
        write_atomic(study.train_metrics(args.name), dumps(curve.timing()))
        tracking.log_metrics({"init_val_loss": curve.rows[0]["val_loss"], "final_val_loss": curve.rows[-1]["val_loss"],
                              "train_seconds": curve.seconds, "tokens_seen": meta["tokens_seen"],
                              "extra_tokens": meta["extra_tokens"]})
        tracking.log_model_dir(out, study.tracking.log_models)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"upcycle@{args.name} ({entry.method} of {', '.join(parents)}): {meta['params']:,} params "
          f"({meta['active_params']:,} active), val_loss {curve.rows[0]['val_loss']:.4f} after the transform, "
          f"{curve.rows[-1]['val_loss']:.4f} after {train.max_steps} steps ({curve.seconds:.1f} s)" + stage_clock(curve.fit_seconds))


def load_sources(study, name: str, names: list[str], data_meta: dict) -> dict:
    """name -> (model, meta) for the parent names[0] and its branches, checked before any weight is
    read: each a usable input (built, on the data prepared now), all of the parent's config."""
    problems = [p for n in names for p in input_problems(study, n, data_meta, "branch" if n != names[0] else "parent")]
    if not problems:                                           # all built: compare their configs
        parent = read_json(study.model_dir(names[0]) / "config.json")
        for n in names[1:]:
            config = read_json(study.model_dir(n) / "config.json")
            if config != parent:
                diff = {k: v for k, v in config.items() if parent.get(k) != v}
                problems.append(f"'{n}' has another config than its parent '{names[0]}' ({diff}): "
                                f"branches must be copies of the parent; rebuild it")
    if problems:
        raise ParamsError("\n".join(f"upcycle.{name}: {p}" for p in problems))
    return {n: load_model_dir(study.model_dir(n)) for n in names}


def transform(entry, sources: dict, experts: list[str], seed: int) -> TransformerLM:
    """The model the mix phase starts from: the parent itself (continue) or its MoE, whose expert e
    comes from experts[e]."""
    parent = sources[entry.parent][0]
    match entry:
        case Continue():
            return parent
        case Sparse():
            noise = entry.expert_noise
        case Btx() | Bam():                                    # one expert per branch: no noise needed
            noise = 0.0
    cfg = replace(parent.cfg, **entry.config_fields(len(experts)))
    distinct = list(dict.fromkeys(experts))                    # sparse: [parent]; btx/bam: branches (+ parent)
    sd = upcycle_state_dict(cfg, parent.cfg, [sources[n][0].state_dict() for n in distinct],
                            [distinct.index(n) for n in experts], seed, entry.router_init, noise)
    model = TransformerLM(cfg)
    model.load_state_dict(sd)
    return model


def upcycle_meta(entry, parents, experts, sources, data_meta, params_hash, train, cfg, model) -> dict:
    """meta.json: lineage, the tokens beyond the parent (its branches' and this stage's), sizes, FLOPs
    (the lineage's: the parent's, what each branch added, this stage's)."""
    tokens = train.max_steps * train.batch_size * cfg.block_size
    parent_tokens = sources[entry.parent][1]["tokens_seen"]
    branch_tokens = sum(m["tokens_seen"] - parent_tokens for n, (_, m) in sources.items() if n != entry.parent)
    return {"stage": "upcycle", "method": entry.method, "parents": parents, "experts": experts,
            "data_sha256": data_meta["sha256"], "params_hash": params_hash,
            "tokens_seen": parent_tokens + branch_tokens + tokens, "extra_tokens": branch_tokens + tokens,
            "steps": train.max_steps, "params": model.num_params(), "active_params": model.num_active_params(),
            "settings": entry.model_dump(exclude={"method", "parent", *StageTrainParams.model_fields}),
            **flops_meta(model, tokens, inherited_flops([m for _, m in sources.values()]))}   # the parent first


if __name__ == "__main__":
    cli(main)
