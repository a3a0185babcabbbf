"""The corpus: which files the `data` section selects, their texts, their hash, their domains.

Every glob in `data` (include, exclude, domains) means what `Path.glob` means under the source
root: `*` stays inside one directory, `**/` spans any number of them. So `*.py` is the top level
only, `test/*.py` the test directory only, `**/*.py` every Python file. Exclude and domain globs
are matched the same way (a file is excluded when the glob would have found it), not with
fnmatch, whose `*` also crosses '/'. data.source is a pinned package release, the
standard library or a directory (source_root). Every problem is a ParamsError whose message says the fix.

    python -c "from components.corpus import select_files; print(len(select_files('stdlib', ['*.py'], [])[1]))"
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sysconfig
from pathlib import Path

from components.errors import ParamsError


def source_root(source: str) -> Path:
    """The directory that data.source names (see DataParams.source): 'package:<name>==<version>' -> the
    installed sources of exactly that release; 'stdlib' -> this interpreter's standard library
    directory; anything else -> a directory, relative to cwd."""
    if source.startswith("package:"):
        return package_root(source.removeprefix("package:"))
    root = Path(sysconfig.get_paths()["stdlib"] if source == "stdlib" else source).resolve()
    if not root.is_dir():
        raise ParamsError(f"data.source: directory {root} does not exist (data.source={source!r}, "
                          f"relative to {Path.cwd()}); point data.source at the corpus directory, or use "
                          f"'package:<name>==<version>' or 'stdlib'")
    return root


def package_root(spec: str) -> Path:
    """'sympy==1.14.0' -> the directory of the installed package sympy, which must be release 1.14.0:
    a pinned release is the same bytes on every machine and Python version."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", spec)
    if not m:
        raise ParamsError(f"data.source: 'package:{spec}' must pin one release, like 'package:sympy==1.14.0', "
                          f"so that every machine reads the same bytes")
    name, version = m.groups()
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ParamsError(f"data.source: package {name} is not installed: pip install {name}=={version}") from None
    if dist.version != version:
        raise ParamsError(f"data.source: wants {name} {version}, this environment has {dist.version}: "
                          f"pip install {name}=={version} (or change the pin, which changes the corpus)")
    root = Path(dist.locate_file(name.replace("-", "_")))
    if not root.is_dir():
        raise ParamsError(f"data.source: {name} {version} is installed, but not as a directory {root}; "
                          f"point data.source at the directory that holds its files")
    return root.resolve()


def rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def glob_files(root: Path, globs: list[str], key: str) -> dict[str, set[str]]:
    """glob -> relative posix paths of the regular files it finds under root; `key` names it in errors."""
    bad = [g for g in globs if not g or g.startswith("/") or ".." in Path(g).parts]
    if bad:
        raise ParamsError(f"{key}: {', '.join(map(repr, bad))} must be non-empty globs relative to data.source, "
                          f"without '..'; point data.source at the directory instead")
    return {g: {rel(root, p) for p in root.glob(g) if p.is_file()} for g in globs}


def select_files(source: str, include: list[str], exclude: list[str]) -> tuple[Path, list[Path]]:
    """(root, files): the regular files found by any include glob and no exclude glob, sorted by relative path.

    Every include glob must find at least one file, so a typo cannot silently shrink the corpus.
    The files must be UTF-8 text.
    """
    root = source_root(source)
    found = glob_files(root, include, "data.include")
    unmatched = [g for g, paths in found.items() if not paths]
    if unmatched:
        raise ParamsError(f"data.include: {', '.join(map(repr, unmatched))} matched no file under {root}; "
                          f"fix or remove these globs (they are relative to data.source; '*' stays in one directory)")
    excluded = set().union(*glob_files(root, exclude, "data.exclude").values())
    kept = sorted(set().union(*found.values()) - excluded)
    if not kept:
        raise ParamsError(f"data.exclude {exclude} removes every file that data.include {include} selects under "
                          f"{root}; narrow data.exclude")
    files = [root / r for r in kept]
    read_texts(root, files)   # fail now, naming every file that is not UTF-8 text
    return root, files


def read_texts(root: Path, files: list[Path]) -> list[str]:
    """The files' contents, decoded exactly (no newline translation): text.encode() gives the bytes back."""
    texts, bad = [], []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.append(f"{rel(root, f)} (byte {e.start})")
    if bad:
        raise ParamsError(f"{len(bad)} selected file(s) under {root} are not UTF-8 text: {', '.join(bad)}; "
                          f"add them to data.exclude")
    return texts


def corpus_sha256(root: Path, files: list[Path]) -> str:
    """sha256 over the files in relative-path order, each as: relative posix path, NUL, its bytes."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: rel(root, f)):
        h.update(rel(root, f).encode("utf-8") + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def domain_files(root: Path, files: list[Path], domains: dict[str, list[str]]) -> dict[str, list[Path]]:
    """name -> the selected files that any of the domain's globs finds, in corpus order. Every glob
    must find at least one selected file, so a typo cannot silently shrink a domain."""
    selected = {rel(root, f) for f in files}
    out, unmatched = {}, []
    for name, globs in domains.items():
        found = {g: paths & selected for g, paths in glob_files(root, globs, f"data.domains.{name}").items()}
        unmatched += [f"data.domains.{name}: {g!r}" for g, paths in found.items() if not paths]
        in_domain = set().union(*found.values())
        out[name] = [f for f in files if rel(root, f) in in_domain]
    if unmatched:
        raise ParamsError(f"{', '.join(unmatched)} matched none of the {len(files)} selected files under {root}. "
                          "Domain globs pick among the files data.include selects, relative to data.source "
                          "('*' stays in one directory): fix the globs or data.include")
    return out
