"""Model directories and small files, written atomically.

A model directory explains itself: `model.safetensors` (weights), `config.json` (the resolved
ModelConfig: loading needs nothing else) and `meta.json` (stage, parents, hashes, tokens seen).

    model, cfg, meta = load_model_dir("models/parallel")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from components.config import ModelConfig
from components.model import TransformerLM
from components.errors import ParamsError


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def short_hash(obj) -> str:
    """A stable 16-hex-digit hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def save_model_dir(dst: str | Path, model: TransformerLM, meta: dict, files: dict[str, str] | None = None):
    """Write model + config + meta (+ extra text files) to a temp dir, then swap it into place."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights(model), tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(dumps(model.cfg.to_dict()))
    (tmp / "meta.json").write_text(dumps(meta))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def load_model_dir(path: str | Path) -> tuple[TransformerLM, dict]:
    """(model in eval mode, meta) from a model directory."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise ParamsError(f"no model at {path}: build it first (dvc repro, or the stage that makes it)")
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = TransformerLM(cfg)
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) == tied_head(model), (missing, unexpected)
    return model.eval(), json.loads((path / "meta.json").read_text())


def weights(model: TransformerLM) -> dict:
    """The tensors to save. A tied lm_head is the embedding: saved once, as wte.weight, always the
    same name (safetensors' save_model picks one of the tied names per process: not byte-stable)."""
    sd = model.state_dict()
    for k in tied_head(model):
        del sd[k]
    return {k: v.contiguous() for k, v in sd.items()}   # int8 weights stay int8 (with their float scales)


def tied_head(model: TransformerLM) -> set[str]:
    """The lm_head tensors that are the embedding's (lm_head.weight; int8: lm_head.weight_q and .scale)."""
    return {k for k in model.state_dict() if k.startswith("lm_head.")} if model.cfg.tie_embeddings else set()
