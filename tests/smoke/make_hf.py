"""The smoke study's Hugging Face checkpoints: tiny random Llama, Pythia (GPT-NeoX) and Falcon models that
share one tokenizer, built locally from a transformers config (nothing downloaded) -> tests/smoke/hf/.

    .venv/bin/python -m tests.smoke.make_hf        # rewrites tests/smoke/hf/ (committed; same bytes every run)

The tokenizer is the byte-level BPE archflow's prepare stage trains on the smoke corpus (vocab 512),
saved in HF's format with a tokenizer_config.json, so `data.tokenizer: hf` reads the same tokens the
bpe kind would. The three models stand for the three import mappings (Llama -> serial, GPT-NeoX ->
parallel-2norm, Falcon -> parallel) and for what real checkpoints do: Llama is stored in bfloat16,
Pythia's embedding is padded past the vocabulary (576 rows for 512 tokens) and its head is untied.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

from components.corpus import read_texts, select_files
from components.params import load_study
from components.tokenizer import EOT, train_tokenizer

HERE = Path(__file__).resolve().parent
OUT = HERE / "hf"
SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
MODELS = {   # name -> (model_type, config overrides, dtype stored)
    "llama": ("llama", dict(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True), torch.bfloat16),
    "pythia": ("gpt_neox", dict(intermediate_size=256, rotary_pct=0.25, tie_word_embeddings=False, vocab_size=576),
               torch.float32),
    "falcon": ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
               torch.float32),
}


def main() -> None:
    data = load_study(HERE / "params.yaml").data
    root, files = select_files(data.source, data.include, data.exclude)
    tokenizer = train_tokenizer("bpe", read_texts(root, files), 512)
    transformers.logging.set_verbosity_error()
    shutil.rmtree(OUT, ignore_errors=True)
    for i, (name, (kind, overrides, dtype)) in enumerate(MODELS.items()):
        config = transformers.AutoConfig.for_model(kind, **{"vocab_size": tokenizer.vocab_size, **SIZE, **overrides,
                                                            "bos_token_id": tokenizer.eot_id,
                                                            "eos_token_id": tokenizer.eot_id})
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
        model.save_pretrained(OUT / name)
        tokenizer.save(OUT / name / "tokenizer.json")
        (OUT / name / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT}, indent=2) + "\n")
        if (OUT / name / "generation_config.json").exists():
            (OUT / name / "generation_config.json").unlink()
        print(f"{OUT / name}: {kind}, {model.num_parameters():,} params, {dtype}")


if __name__ == "__main__":
    main()
