"""corpus: a manifest of the bytes `prepare` reads -> data/corpus.json (DVC runs it on every repro).

    python -m tasks.corpus                  # what `dvc repro corpus` runs; `dvc repro` runs it every time

DVC cannot list a corpus as a dependency when its files are chosen by globs, or live in an installed
package: so this cheap stage selects the files the `data` section names (checking every glob and
that every file is UTF-8) and writes their count, size and sha256. When no byte changed the
manifest is unchanged and nothing downstream reruns; any edited, added, removed or renamed file,
or another interpreter's stdlib, changes the sha256 and `prepare` reruns. Takes about a second
for the default corpus (the files are read twice: to check them and to hash them). With
data.tokenizer hf the manifest also holds the sha256 of the tokenizer files prepare reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from components.corpus import corpus_sha256, domain_files, select_files
from components.errors import ParamsError, cli
from components.files import write_atomic
from components.params import load_study
from components.tokenizer import hf_files

MANIFEST = Path("data/corpus.json")


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    data = load_study().data
    root, files = select_files(data.source, data.include, data.exclude)
    domains = domain_files(root, files, data.domains)
    manifest = {"source": data.source, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                "sha256": corpus_sha256(root, files), "domains": {name: len(fs) for name, fs in domains.items()}}
    if data.tokenizer == "hf":
        manifest["hf_tokenizer"] = tokenizer_manifest(data.hf_tokenizer)
    changed = write_atomic(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"corpus: {manifest['files']} files, {manifest['bytes'] / 1e6:.1f} MB under {root}, sha256 "
          f"{manifest['sha256'][:12]}: {'changed' if changed else 'unchanged'} -> {MANIFEST}")


def tokenizer_manifest(path: str) -> dict:
    """The path and sha256 of the hf tokenizer's files (tokenizer.json and tokenizer_config.json)."""
    try:
        files = [f for f in hf_files(path) if f is not None]
    except FileNotFoundError as e:
        raise ParamsError(f"data.hf_tokenizer: {e}") from None
    return {"path": path, **{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}


if __name__ == "__main__":
    cli(main)
