"""export: an archflow model directory -> a Hugging Face directory (config.json, model.safetensors)
that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with no custom code.

    python -m tasks.export models/<name> <out_dir> [--tokenizer data/prepared/tokenizer.json]

serial (rmsnorm, swiglu, rope) -> Llama; parallel-2norm (layernorm, gelu, rope, bias, MHA) -> GPT-NeoX;
parallel, and what GPT-NeoX cannot express, -> Falcon (components/hf.py has the table); a model
imported from one of these goes back to its own family. Models with no Hugging Face equivalent
(par, one-wide-ffn, hybrid, DenseFormer, looped, MoE, mixture of attention, pruned per-layer widths)
are refused with the reason. int8 models are written dequantised (W_q * s: the weights the int8
model computes with, in float32). --tokenizer copies a bpe tokenizer.json (HF `tokenizers` format)
with a tokenizer_config.json, or an hf one (data.tokenizer hf) with its own; char and byte
tokenizers have no HF form and are refused.
Needs the `hf` extra only to load the result, not to write it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from components.artifacts import dumps, load_model_dir
from components.errors import ParamsError, cli
from components.hf import dequantized_state, hf_config, hf_family, hf_norm_biases, state_to_hf
from components.tokenizer import CONFIG, EOT, Tokenizer


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="an archflow model directory, e.g. models/serial")
    ap.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    ap.add_argument("--tokenizer", type=Path, help="the study's data/prepared/tokenizer.json (bpe or hf)")
    args = ap.parse_args(argv)
    model, meta = load_model_dir(args.model_dir)
    cfg, sd = model.cfg, model.state_dict()
    if cfg.quant == "int8":                                 # the float weights the int8 model computes with
        cfg, sd = dataclasses.replace(cfg, quant="", quant_embeddings=False), dequantized_state(sd)
    kind = hf_family(cfg, prefer=meta.get("source", {}).get("model_type"))   # or why none can express it
    config, tensors = hf_config(cfg, kind), state_to_hf(cfg, kind, sd)
    tensors |= {name: torch.zeros(cfg.n_embd) for name in hf_norm_biases(cfg, kind)}
    files = {"config.json": dumps(config)}
    if args.tokenizer is not None:
        files |= tokenizer_files(args.tokenizer, cfg.vocab_size)
        config["bos_token_id"] = config["eos_token_id"] = Tokenizer.load(args.tokenizer).eot_id
        files["config.json"] = dumps(config)
    write_dir(args.out_dir, tensors, files)
    print(f"export: {args.model_dir} ({cfg.block}) -> {args.out_dir} ({kind}, {config['architectures'][0]})")


def tokenizer_files(path: Path, vocab_size: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for PreTrainedTokenizerFast, from a bpe tokenizer; an hf
    one (an imported model's) goes back as it came, with its own tokenizer_config.json."""
    tok = Tokenizer.load(path)
    if tok.kind not in ("bpe", "hf"):
        raise ParamsError(f"{path} is a {tok.kind} tokenizer, which has no Hugging Face form: export without "
                          f"--tokenizer (only bpe and hf tokenizers are written as tokenizer.json)")
    if tok.vocab_size > vocab_size or (tok.kind == "bpe" and tok.vocab_size != vocab_size):
        raise ParamsError(f"{path} has {tok.vocab_size} tokens but the model has vocab_size {vocab_size}: "
                          f"give the tokenizer of the study the model was trained in")
    if tok.kind == "hf":
        return {"tokenizer.json": path.read_text(), CONFIG: path.with_name(CONFIG).read_text()}
    # archflow encodes a literal "<|endoftext|>" in text as ordinary text (encode_special_tokens);
    # PreTrainedTokenizerFast encodes it as the EOT token. Token ids of other text are the same.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
              "unk_token": None, "model_max_length": None, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": path.read_text(), CONFIG: json.dumps(config, indent=2) + "\n"}


def write_dir(dst: Path, tensors: dict, files: dict[str, str]) -> None:
    """Write the directory beside dst, then swap it in (dst is whole or absent, never half written)."""
    tmp, old = (dst.with_name(f".{dst.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    cli(main)
