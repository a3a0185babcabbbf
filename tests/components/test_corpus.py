"""Corpus selection, hash and domains on a tiny directory tree.

    .venv/bin/python -m pytest tests/components/test_corpus.py -q
"""
import hashlib
import sysconfig
from pathlib import Path

import pytest

from components.corpus import corpus_sha256, domain_files, read_texts, select_files
from components.errors import ParamsError

FILES = {"b.py": "b = 2\n", "a.py": "a = 1\n", "pkg/z.py": "z = 'é'\n", "pkg/sub/y.py": "y = 3\n",
         "pkg/notes.txt": "notes\n", "test/test_a.py": "assert 1\n"}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "dir.py").mkdir()   # a directory matching *.py is not a file
    return root


def rels(root, files):
    return [f.relative_to(root).as_posix() for f in files]


def test_selection_sorted_and_deterministic(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    root, files = select_files("corpus", ["pkg/**/*.py", "*.py", "a.py"], [])
    assert root == corpus.resolve() and all(f.is_absolute() for f in files)
    assert rels(root, files) == ["a.py", "b.py", "pkg/sub/y.py", "pkg/z.py"]
    assert select_files(str(corpus), ["*.py", "pkg/**/*.py"], []) == (root, files)
    assert rels(*select_files(str(corpus), ["**/*.py"], [])) == ["a.py", "b.py", "pkg/sub/y.py", "pkg/z.py",
                                                                 "test/test_a.py"]  # '**/' spans zero directories too


def test_exclude_globs_mean_what_include_globs_mean(corpus):
    root, files = select_files(str(corpus), ["**/*.py"], ["pkg/*", "b.py"])
    assert rels(root, files) == ["a.py", "pkg/sub/y.py", "test/test_a.py"]     # '*' stays inside pkg/
    root, files = select_files(str(corpus), ["**/*.py"], ["pkg/**/*.py", "*.py", "no/such/*"])
    assert rels(root, files) == ["test/test_a.py"]                              # '*.py' is the top level only


def test_read_texts(corpus):
    root, files = select_files(str(corpus), ["pkg/z.py", "a.py"], [])
    assert read_texts(root, files) == ["a = 1\n", "z = 'é'\n"]


def test_stdlib_source():
    root, files = select_files("stdlib", ["json/*.py"], ["json/tool.py"])
    assert root == Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert rels(root, files) == ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py"]


def test_missing_directory(tmp_path):
    with pytest.raises(ParamsError, match=r"data.source: directory .*nowhere does not exist .*point data.source"):
        select_files(str(tmp_path / "nowhere"), ["*.py"], [])


def test_glob_matching_nothing_is_named(corpus):
    with pytest.raises(ParamsError, match=r"data.include: '\*.rs' matched no file under .*fix or remove"):
        select_files(str(corpus), ["*.py", "*.rs"], [])
    with pytest.raises(ParamsError, match=r"data.include: '\.\./\*.py' must be .* relative"):
        select_files(str(corpus), ["../*.py"], [])


def test_exclude_removing_everything(corpus):
    with pytest.raises(ParamsError, match=r"data.exclude \['\*'\] removes every file .*narrow data.exclude"):
        select_files(str(corpus), ["*.py"], ["*"])


def test_bad_utf8_names_every_file(corpus):
    (corpus / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (corpus / "pkg" / "bin.py").write_bytes(b"\xff\xfe")
    with pytest.raises(ParamsError, match=r"2 selected file\(s\) .* not UTF-8 text: latin1.py \(byte 8\), "
                                          r"pkg/bin.py \(byte 0\); add them to data.exclude"):
        select_files(str(corpus), ["**/*.py"], [])
    root, files = select_files(str(corpus), ["**/*.py"], ["latin1.py", "pkg/bin.py"])
    assert len(files) == 5


def test_hash_definition_and_sensitivity(corpus):
    root, files = select_files(str(corpus), ["*.py"], [])
    expected = hashlib.sha256(b"a.py\0a = 1\nb.py\0b = 2\n").hexdigest()
    assert corpus_sha256(root, files) == corpus_sha256(root, files[::-1]) == expected
    (corpus / "b.py").write_text("b = 3\n")
    assert corpus_sha256(root, files) != expected


def test_domains(corpus):
    root, files = select_files(str(corpus), ["**/*.py"], [])
    domains = domain_files(root, files, {"pkg": ["pkg/**/*.py"], "top": ["*.py"], "sub": ["pkg/*/*"]})
    assert {k: rels(root, v) for k, v in domains.items()} == {"pkg": ["pkg/sub/y.py", "pkg/z.py"],
                                                             "top": ["a.py", "b.py"], "sub": ["pkg/sub/y.py"]}


def test_every_domain_glob_must_find_a_selected_file(corpus):
    root, files = select_files(str(corpus), ["**/*.py"], [])
    with pytest.raises(ParamsError, match=r"data.domains.top: 'nothing/\*', data.domains.docs: 'pkg/\*.txt', "
                                          r"data.domains.rs: '\*.rs' matched none of the 5 selected files under "
                                          r".*fix the globs or data.include"):
        domain_files(root, files, {"top": ["*.py", "nothing/*"], "docs": ["pkg/*.txt"], "rs": ["*.rs"]})


def test_package_source_is_a_pinned_release():
    import sympy

    root, files = select_files(f"package:sympy=={sympy.__version__}", ["core/tests/test_a*.py"], [])
    assert root == Path(sympy.__file__).parent.resolve()
    assert rels(root, files)[0] == "core/tests/test_args.py"
    for spec, problem in [("sympy", r"must pin one release, like 'package:sympy==1.14.0'"),
                          ("sympy==0.1", rf"wants sympy 0.1, this environment has {sympy.__version__}: "
                                         r"pip install sympy==0.1"),
                          ("no-such-pkg==1.0", r"package no-such-pkg is not installed: pip install no-such-pkg==1.0")]:
        with pytest.raises(ParamsError, match=f"data.source: .*{problem}"):
            select_files(f"package:{spec}", ["*.py"], [])
