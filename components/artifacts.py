"""Model directories and small files, written atomically; the checked reading of a stage's inputs.

A model directory explains itself: `model.safetensors` (weights), `config.json` (the resolved
ModelConfig: loading needs nothing else) and `meta.json` (stage, parents, hashes, tokens seen).

    model, meta = load_model_dir("models/parallel")
    data_meta = prepared_meta()                       # data/prepared/meta.json, or the `dvc repro` fix
    parent, meta = load_input(study, "parallel", data_meta, "branch.b.parent", "parent")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from components.config import ModelConfig
from components.errors import ParamsError
from components.model import TransformerLM

PREPARED = Path("data/prepared")          # what the prepare stage writes: tokenizer, token ids, meta.json


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def short_hash(obj) -> str:
    """A stable 16-hex-digit hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def save_model_dir(dst: str | Path, model: TransformerLM, meta: dict, files: dict[str, str] | None = None):
    """Write model + config + meta (+ extra text files) to a temp dir, then swap it into place: the
    previous directory is renamed aside, not deleted, until the new one is in place, so `dst` is
    always a whole directory (or, between the two renames, none); a failed write leaves it as it was.
    What killed writers left aside is removed first (DVC lets one stage at a time write `dst`)."""
    dst = Path(dst)
    for leftover in [*dst.parent.glob(f".{dst.name}.tmp-*"), *dst.parent.glob(f".{dst.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp, old = (dst.with_name(f".{dst.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    try:
        tmp.mkdir(parents=True)
        save_file(weights(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(dumps(model.cfg.to_dict()))
        (tmp / "meta.json").write_text(dumps(meta))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # cleanup only; the error itself propagates
        raise
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def load_model_dir(path: str | Path) -> tuple[TransformerLM, dict]:
    """(model in eval mode, meta) from a model directory; a damaged file is a ParamsError naming it."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise ParamsError(f"no model at {path}: build it first (dvc repro, or the stage that makes it)")
    cfg = ModelConfig.from_dict(read_json(path / "config.json"))
    meta = read_json(path / "meta.json")
    model = TransformerLM(cfg)
    state = read_checked(path / "model.safetensors", load_file)
    missing, unexpected = read_checked(path / "model.safetensors", lambda f: model.load_state_dict(state, strict=False))
    assert not unexpected and set(missing) == tied_head(model), (missing, unexpected)
    return model.eval(), meta


def read_json(file: Path):
    return read_checked(file, lambda f: json.loads(f.read_text()))


def read_checked(file: Path, read):
    """read(file), or one ParamsError that names the file, what is wrong with it and the fix."""
    try:
        return read(file)
    except Exception as e:      # truncated, not JSON, not safetensors, or weights of another shape
        raise ParamsError(f"{file} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}): restore it "
                          f"with `dvc checkout --force {file.parent}`, or rebuild it with `dvc repro -f` of the stage "
                          f"that writes {file.parent} (`dvc status` names it)") from None


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


# ---------------------------------------------------------------------------------------------
# a stage's inputs, checked before any compute: each problem names the `dvc repro` that fixes it


def prepared_meta(domain: str | None = None) -> dict:
    """data/prepared/meta.json, once the prepare stage has written it (and, with `domain`, that
    domain's token files)."""
    if not (PREPARED / "meta.json").exists():
        raise ParamsError(f"{PREPARED} is missing: run `dvc repro prepare` first")
    meta = read_json(PREPARED / "meta.json")
    if domain is not None and domain not in meta.get("domains", {}):
        raise ParamsError(f"{PREPARED} has no domain '{domain}' (it has {', '.join(meta.get('domains', {}))}): "
                          f"data was prepared before data.domains.{domain} was added; run `dvc repro prepare`")
    return meta


def input_problems(study, name: str, data_meta: dict, role: str) -> list[str]:
    """Why model `name` of the study cannot be a stage's input (its `role`: parent, teacher, ...):
    not built, or made from other prepared data (another corpus, or another tokenizer: its token
    ids would mean other text). Empty if it can."""
    path, model = study.model_dir(name), study.models()[name]
    stage = model["stage"]
    fix = f"`dvc repro {model.get('group', stage)}@{name}`"      # group: pretrain-replica for a replicate seed's
    if not (path / "model.safetensors").exists():
        return [f"the {role} '{name}' is not built ({path} is missing): run {fix} first"]
    config, meta = read_json(path / "config.json"), read_json(path / "meta.json")
    p = []
    if stage == "import":                  # not trained here: its tokenizer must be the study's (data.hf_tokenizer)
        if meta.get("tokenizer_sha256") not in (None, data_meta.get("tokenizer_sha256")):
            p.append(f"the {role} '{name}' was imported with another tokenizer than {PREPARED}'s "
                     f"(data.hf_tokenizer {data_meta.get('hf_tokenizer')}): rebuild it with {fix}, or set "
                     f"data.hf_tokenizer to its directory")
    elif meta.get("data_sha256") != data_meta["sha256"]:
        p.append(f"the {role} '{name}' was trained on other prepared data (another corpus): rebuild it with {fix}")
    # hf tokenizers: an embedding padded past the vocabulary (Pythia: 50304 rows, 50277 tokens) is fine
    padded = data_meta.get("tokenizer") == "hf" and config["vocab_size"] > data_meta["vocab_size"]
    if config["vocab_size"] != data_meta["vocab_size"] and not padded:
        p.append(f"the {role} '{name}' has vocab_size {config['vocab_size']} but {PREPARED} has "
                 f"{data_meta['vocab_size']} (another tokenizer): rebuild it with {fix}")
    return p


def load_input(study, name: str, data_meta: dict, where: str, role: str) -> tuple[TransformerLM, dict]:
    """(model, meta) of model `name`, once input_problems finds none; `where` (the params.yaml key
    that names it, e.g. distill.kd.teacher) starts each message."""
    if problems := input_problems(study, name, data_meta, role):
        raise ParamsError("\n".join(f"{where}: {p}" for p in problems))
    return load_model_dir(study.model_dir(name))
