"""hf_import: a Hugging Face causal-LM directory (config.json + safetensors) -> an archflow model
directory that every stage reads (evaluate, upcycle, distill, compress).

    python -m tasks.hf_import <hf_dir> models/<name>

Llama/Mistral -> serial, GPT-NeoX/Pythia -> parallel-2norm, Falcon -> parallel (components/hf.py has
the table). The config is checked first: an option archflow cannot compute exactly (sliding window,
ALiBi, rope scaling, an MoE or unknown model_type, ...) stops the import with one message naming
each, before any weight is read. Weights are read by transformers (local files only, no remote
code) from safetensors only (model.safetensors or its shards; a pickle-only directory, e.g.
pytorch_model.bin, is refused with how to convert it) and upcast to float32: a bfloat16 or float16
checkpoint imports its exact values. meta.json names the source: the path given, model_type, the
dtype config.json names, the repository the config names (_name_or_path) and, for a Hugging Face
cache snapshot, its commit. Needs the `hf` extra (transformers).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from components.artifacts import read_json, save_model_dir, short_hash, tied_head
from components.errors import ParamsError, cli
from components.hf import FAMILIES, config_from_hf, state_from_hf, weights_problem
from components.model import TransformerLM


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path, help="a local Hugging Face model directory (config.json + weights)")
    ap.add_argument("out_dir", type=Path, help="the archflow model directory to write, e.g. models/pythia-70m")
    args = ap.parse_args(argv)
    if not (args.hf_dir / "config.json").exists():
        raise ParamsError(f"{args.hf_dir} has no config.json: give a local Hugging Face model directory")
    raw = read_json(args.hf_dir / "config.json")
    try:                                                     # the optional `hf` extra: imported on use
        from transformers import AutoConfig, AutoModelForCausalLM
    except ModuleNotFoundError as e:
        raise ParamsError(f"hf_import reads checkpoints with transformers ({e}): pip install -e '.[hf]'") from e

    # transformers fills the defaults config.json leaves out; an unknown model_type is reported as is
    known = raw.get("model_type") in FAMILIES
    hf = AutoConfig.from_pretrained(args.hf_dir, local_files_only=True).to_dict() if known else raw
    cfg = config_from_hf(hf)                               # every problem, before any tensor is read
    if problem := weights_problem({f.name for f in args.hf_dir.iterdir()}):   # safetensors only, no pickles
        raise ParamsError(f"{args.hf_dir} {problem}")
    source = AutoModelForCausalLM.from_pretrained(args.hf_dir, local_files_only=True, dtype=torch.float32,
                                                  use_safetensors=True)
    model = TransformerLM(cfg)
    missing, unexpected = model.load_state_dict(state_from_hf(cfg, hf["model_type"], source.state_dict()), strict=False)
    assert not unexpected and set(missing) == tied_head(model), (missing, unexpected)
    source = source_of(args.hf_dir, raw)
    # the lineage keys the stages read from an input model; tokens_seen counts tokens trained in archflow
    # (the checkpoint's own pretraining is not in its config). No data_sha256: it was not trained on
    # the study's prepared data, which load_input checks.
    meta = {"stage": "import", "method": "hf", "parents": [], "source": source, "params": model.num_params(),
            "tokens_seen": 0, "params_hash": short_hash({"stage": "import", "source": source, "model": cfg.to_dict()})}
    save_model_dir(args.out_dir, model.eval(), meta)
    print(f"hf_import: {hf['model_type']} {args.hf_dir} -> {args.out_dir} (block {cfg.block}, "
          f"{model.num_params() / 1e6:.1f}M params)")


def source_of(hf_dir: Path, raw: dict) -> dict:
    """Where the weights came from: the path given, model_type, the dtype config.json names (dtype,
    torch_dtype before transformers 4.56; the stored one, upcast to float32 on import), the repository
    config.json names (_name_or_path, when the writer kept it) and the commit of a Hugging Face cache
    download (.../snapshots/<commit>/)."""
    source = {"path": str(hf_dir), "model_type": raw["model_type"]}
    if raw.get("dtype") or raw.get("torch_dtype"):
        source["dtype"] = raw.get("dtype") or raw["torch_dtype"]
    if raw.get("_name_or_path"):
        source["name_or_path"] = raw["_name_or_path"]
    commit = hf_dir.resolve()
    if commit.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", commit.name):
        source["revision"] = commit.name
    return source


if __name__ == "__main__":
    cli(main)
