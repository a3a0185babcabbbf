"""prepare: select the corpus, train the tokenizer, write token ids for training and validation.

    python -m tasks.prepare                 # what `dvc repro prepare` runs, from the project root

Reads the `data` section of params.yaml and writes data/prepared/:
    tokenizer.json                  Tokenizer.load() reads it (hf: with its tokenizer_config.json)
    train.bin, val.bin              flat token ids (dtype in meta.json), np.memmap-able
    domains/<name>/{train,val}.bin  the same, for the files of each data.domains entry
    meta.json                       source, corpus hash, tokenizer, token counts (nothing machine-specific)
Each document (file) is encoded on its own. Its last floor(n * val_fraction) tokens, but at
least one when it has two or more, go to val; the rest, followed by <|endoftext|>, go to train.
So val is made of document endings and holds no EOT; train + val holds every token exactly once.
The output is built in a temporary sibling directory and swapped in at the end, so a failed or
interrupted run leaves the previous data/prepared as it was. Two runs give identical bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from components.corpus import corpus_sha256, domain_files, read_texts, select_files
from components.errors import ParamsError, cli, stage_clock
from components.params import load_study
from components.tokenizer import train_tokenizer
from components import tracking

OUT = Path("data/prepared")


def split(ids: list[int], eot_id: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) of one document's tokens: val is the tail, train the head + EOT."""
    n_val = max(1, int(len(ids) * val_fraction)) if len(ids) >= 2 else 0
    return ids[:len(ids) - n_val] + [eot_id], ids[len(ids) - n_val:]


def write_splits(out: Path, docs: list[tuple[list[int], list[int]]], dtype) -> dict[str, int]:
    """Concatenate the documents' train and val parts into out/train.bin and out/val.bin."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for i, name in enumerate(("train", "val")):
        ids = np.concatenate([np.asarray(doc[i], dtype=dtype) for doc in docs])   # (n_tokens,)
        ids.tofile(out / f"{name}.bin")
        counts[f"{name}_tokens"] = len(ids)
    return counts


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp`; the old output is only deleted once the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    study = load_study()
    tracking.connect(study)                      # an unreachable MLflow backend stops us here, not after the work
    data = study.data
    start = time.perf_counter()

    # 1. The corpus: selected files in path order, their domains, their texts.
    root, files = select_files(data.source, data.include, data.exclude)
    domains = domain_files(root, files, data.domains)
    texts = read_texts(root, files)

    # 2. Tokenizer trained on the whole corpus (hf: read, not trained); every document encoded and split.
    try:
        tokenizer = train_tokenizer(data.tokenizer, texts, data.vocab_size, data.hf_tokenizer)
    except (FileNotFoundError, ValueError) as e:
        if data.tokenizer != "hf":
            raise
        raise ParamsError(f"data.hf_tokenizer: {e}") from None
    encoded = tokenizer.encode_batch(texts)
    docs = {f: split(ids, tokenizer.eot_id, data.val_fraction) for f, ids in zip(files, encoded)}
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)

    # 3. Everything written to a temporary sibling, which replaces data/prepared at the end.
    tmp = OUT.with_name(f".{OUT.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tokenizer.save(tmp / "tokenizer.json")
        counts = write_splits(tmp, list(docs.values()), dtype)
        per_domain = {name: {"globs": data.domains[name], "files": len(fs),
                             **write_splits(tmp / "domains" / name, [docs[f] for f in fs], dtype)}
                      for name, fs in domains.items()}
        empty = [f"domain {name}" for name, c in per_domain.items() if c["val_tokens"] == 0]
        empty = (["the corpus"] if counts["val_tokens"] == 0 else []) + empty
        if empty:
            raise ParamsError(f"no validation tokens for {', '.join(empty)}: every document there is shorter "
                              f"than 2 tokens; add longer files to data.include or the domain's globs")
        meta = {"source": data.source,
                **({"python_version": platform.python_version()} if data.source == "stdlib" else {}),
                "files": len(files), "bytes": sum(len(t.encode("utf-8")) for t in texts),
                "sha256": corpus_sha256(root, files), "include": data.include, "exclude": data.exclude,
                "tokenizer": data.tokenizer, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "dtype": dtype.name, "val_fraction": data.val_fraction, **counts, "domains": per_domain}
        if data.tokenizer == "hf":                 # what import@ and the stages after it check models against
            meta |= {"hf_tokenizer": data.hf_tokenizer, "tokenizer_sha256": tokenizer.sha256()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        swap_in(tmp, OUT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # cleanup only; the error itself propagates
        raise
    seconds = time.perf_counter() - start

    with tracking.stage_run(study, "prepare", params={"data": data.model_dump()}) as run_id:
        if run_id is not None:
            tracking.mlflow.log_metrics({"files": meta["files"], "bytes": meta["bytes"],
                                         "vocab_size": tokenizer.vocab_size, **counts, "seconds": seconds,
                                         **{f"domains.{name}.{k}": v for name, c in per_domain.items()
                                            for k, v in c.items() if k != "globs"}})
            tracking.mlflow.log_dict(meta, "meta.json")
    print(f"prepare: {meta['files']} files, {meta['bytes'] / 1e6:.1f} MB, {data.tokenizer} vocab "
          f"{tokenizer.vocab_size}: train {counts['train_tokens']:,} tokens, val {counts['val_tokens']:,} "
          f"tokens ({seconds:.1f} s) -> {OUT}" + stage_clock(seconds))
    for name, c in per_domain.items():
        print(f"  domain {name}: {c['files']} files, train {c['train_tokens']:,}, val {c['val_tokens']:,} tokens")

if __name__ == "__main__":
    cli(main)
