"""import@<name>: a Hugging Face causal-LM directory (config.json + safetensors) -> models/<name>/, an
archflow model directory that every stage reads (evaluate, branch, upcycle, distill, compress).

    python -m tasks.hf_import pythia                    # what `dvc repro import@pythia` runs: import.pythia of params.yaml
    python -m tasks.hf_import <hf_dir> models/<name>    # any directory, outside a study (no tokenizer check)

(The module is hf_import: `import` is a Python keyword.) Llama/Mistral/Qwen2 -> serial,
GPT-NeoX/Pythia -> parallel-2norm, Falcon -> parallel (components/hf.py has the table). The config is
checked first: an option archflow cannot compute exactly (sliding window, ALiBi, rope scaling, an MoE
or unknown model_type, ...) stops the import with one message naming each, before any weight is
read. In a study the model's tokenizer must be the study's (data.tokenizer hf, data.hf_tokenizer):
the directory's tokenizer.json, when it has one, is compared with it, and the embedding must have a
row for every token. Weights are read by transformers (local files only, no remote code) from
safetensors only (model.safetensors or its shards; a pickle-only directory, e.g. pytorch_model.bin,
is refused with how to convert it) and upcast to float32: a bfloat16 or float16 checkpoint imports its
exact values. meta.json names the source: the path, model_type, the stored dtype, the repository
(import.<name>.hf, else the _name_or_path config.json kept) and its revision (import.<name>.revision,
else the commit of a Hugging Face cache snapshot), and the tokenizer's sha256. Needs the `hf` extra.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from components import tracking
from components.artifacts import dumps, prepared_meta, read_json, save_model_dir, short_hash, tied_head
from components.errors import ParamsError, cli, stage_clock
from components.files import write_atomic
from components.flops import flops_meta
from components.hf import FAMILIES, config_from_hf, state_from_hf, weights_problem
from components.model import TransformerLM
from components.params import load_study
from components.tokenizer import load_hf


def read_hf(hf_dir: Path) -> tuple[dict, dict]:
    """(config.json as written, the same with transformers' defaults filled in), or the reason it
    cannot be read."""
    if not (hf_dir / "config.json").exists():
        raise ParamsError(f"{hf_dir} has no config.json: give a local Hugging Face model directory")
    raw = read_json(hf_dir / "config.json")
    try:                                                     # the optional `hf` extra: imported on use
        from transformers import AutoConfig
    except ModuleNotFoundError as e:
        raise ParamsError(f"hf_import reads checkpoints with transformers ({e}): pip install -e '.[hf]'") from e
    # transformers fills the defaults config.json leaves out; an unknown model_type is reported as is
    known = raw.get("model_type") in FAMILIES
    return raw, AutoConfig.from_pretrained(hf_dir, local_files_only=True).to_dict() if known else raw


def convert(hf_dir: Path, hf: dict) -> TransformerLM:
    """The archflow model of the checkpoint in hf_dir (config_from_hf(hf) has no problems)."""
    from transformers import AutoModelForCausalLM

    cfg = config_from_hf(hf)
    if problem := weights_problem({f.name for f in hf_dir.iterdir()}):   # safetensors only, no pickles
        raise ParamsError(f"{hf_dir} {problem}")
    source = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32,
                                                  use_safetensors=True)
    model = TransformerLM(cfg)
    missing, unexpected = model.load_state_dict(state_from_hf(cfg, hf["model_type"], source.state_dict()), strict=False)
    assert not unexpected and set(missing) == tied_head(model), (missing, unexpected)
    return model.eval()


def source_of(hf_dir: Path, raw: dict, repo: str | None = None, revision: str | None = None) -> dict:
    """Where the weights came from: the path given, model_type, the dtype config.json names (dtype,
    torch_dtype before transformers 4.56; the stored one, upcast to float32 on import), the repository
    (`repo`, else the _name_or_path config.json keeps when the writer kept it) and the revision
    (`revision`, else the commit of a Hugging Face cache download: .../snapshots/<commit>/)."""
    source = {"path": str(hf_dir), "model_type": raw["model_type"]}
    if raw.get("dtype") or raw.get("torch_dtype"):
        source["dtype"] = raw.get("dtype") or raw["torch_dtype"]
    if repo or raw.get("_name_or_path"):
        source["name_or_path"] = repo or raw["_name_or_path"]
    commit = hf_dir.resolve()
    if revision:
        source["revision"] = revision
    elif commit.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", commit.name):
        source["revision"] = commit.name
    return source


def vocabulary_problems(hf_dir: Path, vocab_size: int, data_meta: dict) -> list[str]:
    """Why the checkpoint cannot be scored on the study's tokens: its own tokenizer.json differs from
    the study's, or its embedding has fewer rows than the study's vocabulary."""
    p, study_tok = [], data_meta.get("hf_tokenizer")
    if (hf_dir / "tokenizer.json").exists():
        try:
            own = load_hf(hf_dir)
        except ValueError as e:
            return [str(e)]
        if own.sha256() != data_meta["tokenizer_sha256"]:
            p.append(f"its tokenizer ({hf_dir}/tokenizer.json, {own.vocab_size} tokens) is not the study's "
                     f"(data.hf_tokenizer {study_tok}, {data_meta['vocab_size']} tokens): set data.hf_tokenizer: "
                     f"{hf_dir}, or import a model trained with {study_tok}")
    if vocab_size < data_meta["vocab_size"]:
        p.append(f"its embedding has {vocab_size} rows but the study's tokenizer (data.hf_tokenizer {study_tok}) has "
                 f"{data_meta['vocab_size']} tokens: ids past {vocab_size - 1} could not be scored; use the "
                 f"model's own tokenizer")
    return p


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a key of the import section of params.yaml, or a local Hugging Face model "
                                   "directory (then give out_dir)")
    ap.add_argument("out_dir", type=Path, nargs="?", help="the archflow model directory to write, e.g. models/pythia")
    args = ap.parse_args(argv)
    if args.out_dir is not None:
        import_dir(Path(args.source), args.out_dir)
    else:
        import_entry(args.source)


def import_dir(hf_dir: Path, out_dir: Path) -> None:
    """Outside a study: convert and write, nothing else."""
    raw, hf = read_hf(hf_dir)
    cfg = config_from_hf(hf)                               # every problem, before any tensor is read
    model = convert(hf_dir, hf)
    source = source_of(hf_dir, raw)
    save_model_dir(out_dir, model, lineage(source, cfg, model))
    print(f"hf_import: {hf['model_type']} {hf_dir} -> {out_dir} (block {cfg.block}, "
          f"{model.num_params() / 1e6:.1f}M params)")


def import_entry(name: str) -> None:
    """import@<name>: import.<name> of params.yaml -> models/<name>, checked against the study's tokenizer."""
    study = load_study()
    if name not in study.imports:
        raise ParamsError(f"unknown import '{name}': import has {', '.join(study.imports) or '(none)'}")
    entry, where = study.imports[name], f"import.{name}"
    hf_dir = Path(entry.path)
    if problem := entry.missing(name):
        raise ParamsError(problem)
    data_meta = prepared_meta()
    tracking.connect(study)                      # an unreachable MLflow backend stops us here, not after the work
    raw, hf = read_hf(hf_dir)
    try:
        cfg = config_from_hf(hf)
    except ParamsError as e:
        raise ParamsError(f"{where}: {e}") from None
    if problems := vocabulary_problems(hf_dir, cfg.vocab_size, data_meta):
        raise ParamsError("\n".join(f"{where}: {p}" for p in problems))

    start = time.perf_counter()
    model = convert(hf_dir, hf)
    seconds = time.perf_counter() - start
    source = source_of(hf_dir, raw, entry.hf, entry.revision)
    meta = lineage(source, cfg, model) | {"tokenizer_sha256": data_meta["tokenizer_sha256"]}
    out = study.model_dir(name)
    params = {"model": cfg.to_dict(), "import": {name: entry.model_dump(exclude_none=True)}}
    with tracking.stage_run(study, "import", model=name, params=params,
                            tags={"method": "hf", "model_type": hf["model_type"]}):
        save_model_dir(out, model, meta)
        # an import trains nothing: the report's train columns read 0 s (as for int8)
        write_atomic(study.train_metrics(name), dumps({"train_seconds": 0.0, "tokens_per_s": None, "device": None,
                                                       "world_size": None, "precision": None,
                                                       "threads": torch.get_num_threads(),
                                                       "import_seconds": round(seconds, 3)}))
        tracking.log_metrics({"import_seconds": seconds, "params": model.num_params()})
        tracking.log_model_dir(out, study.tracking.log_models, curve=False)
    print(f"import@{name}: {hf['model_type']} {hf_dir} -> {out} (block {cfg.block}, "
          f"{model.num_params():,} params, {seconds:.1f} s)" + stage_clock(seconds))


def lineage(source: dict, cfg, model: TransformerLM) -> dict:
    """meta.json: the lineage keys the stages read from an input; tokens_seen and total_train_flops count
    training in archflow: 0 (the checkpoint's own pretraining is not in its config; unknown). No data_sha256:
    it was not trained on the study's prepared data (input_problems checks its tokenizer instead)."""
    return {"stage": "import", "method": "hf", "parents": [], "source": source, "params": model.num_params(),
            "tokens_seen": 0, "steps": 0, **flops_meta(model, 0, inherited=0),
            "params_hash": short_hash({"stage": "import", "source": source, "model": cfg.to_dict()})}


if __name__ == "__main__":
    cli(main)
