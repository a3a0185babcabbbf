"""The prepare stage end to end on a tiny corpus: outputs, meta, determinism, atomic replacement.

    .venv/bin/python -m pytest tests/tasks/test_prepare.py -q
"""
import hashlib
import json
import platform

import mlflow
import numpy as np
import pytest

from components.errors import ParamsError
from components.tokenizer import Tokenizer
from components.data import load_tokens
from tasks import corpus as corpus_stage
from tasks import prepare

DOCS = {
    "app/main.py": "import util\n\n\ndef main():\n    print(util.greet('wörld'))\n" * 6,
    "app/util.py": "def greet(name):\n    return f'hello {name}'\n" * 6,
    "lib/core.py": "class Core:\n    def run(self):\n        return [i * i for i in range(10)]\n" * 6,
    "lib/tiny.py": "x\n",
    "README.md": "not selected\n",
}
PARAMS = """\
data:
  source: corpus
  include: ["**/*.py"]
  exclude: []
  domains: {app: ["app/*"], lib: ["lib/core.py", "lib/tiny.py"]}
  tokenizer: %s
  vocab_size: 300
  val_fraction: 0.2
pretrain: {variants: {a: {}}}
"""


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    """One MLflow database for the module: creating its schema takes seconds."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def project(tmp_path, monkeypatch, tracking_db):
    for name, text in DOCS.items():
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_text(text, encoding="utf-8")
    (tmp_path / "params.yaml").write_text(PARAMS % "bpe")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    return tmp_path


def tokens(path, meta):
    return np.fromfile(path, dtype=np.dtype(meta["dtype"])).tolist()


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_splits(tok, path, val_fraction=0.2):
    ids = tok.encode(path.read_text(encoding="utf-8"))
    n_val = max(1, int(len(ids) * val_fraction)) if len(ids) >= 2 else 0
    return ids[:len(ids) - n_val] + [tok.eot_id], ids[len(ids) - n_val:]


def test_prepare_end_to_end(project, capsys):
    prepare.main([])
    out = project / "data" / "prepared"
    assert sorted(snapshot(out)) == ["domains/app/train.bin", "domains/app/val.bin", "domains/lib/train.bin",
                                     "domains/lib/val.bin", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / "tokenizer.json")
    files = ["app/main.py", "app/util.py", "lib/core.py", "lib/tiny.py"]
    corpus = project / "corpus"
    splits = {f: expected_splits(tok, corpus / f) for f in files}
    assert splits["lib/tiny.py"] == ([tok.encode("x\n")[0], 0], [tok.encode("x\n")[1]])   # "x" "\n": one each

    assert tokens(out / "train.bin", meta) == [i for f in files for i in splits[f][0]]
    assert tokens(out / "val.bin", meta) == [i for f in files for i in splits[f][1]]
    total = sum(len(tok.encode((corpus / f).read_text())) + 1 for f in files)   # + one EOT per document
    assert meta["train_tokens"] + meta["val_tokens"] == total
    assert tokens(out / "domains/app/val.bin", meta) == splits["app/main.py"][1] + splits["app/util.py"][1]
    assert tokens(out / "domains/lib/train.bin", meta) == splits["lib/core.py"][0] + splits["lib/tiny.py"][0]

    sha = hashlib.sha256(b"".join(f.encode() + b"\0" + (corpus / f).read_bytes() for f in files)).hexdigest()
    nbytes = sum(len(DOCS[f].encode()) for f in files)
    train = sum(len(splits[f][0]) for f in files)
    assert meta == {
        "source": "corpus", "files": 4, "bytes": nbytes, "sha256": sha,
        "include": ["**/*.py"], "exclude": [], "tokenizer": "bpe", "vocab_size": tok.vocab_size, "eot_id": 0,
        "dtype": "uint16", "val_fraction": 0.2, "train_tokens": train, "val_tokens": total - train,
        "domains": {
            "app": {"globs": ["app/*"], "files": 2,
                    "train_tokens": len(splits["app/main.py"][0]) + len(splits["app/util.py"][0]),
                    "val_tokens": len(splits["app/main.py"][1]) + len(splits["app/util.py"][1])},
            "lib": {"globs": ["lib/core.py", "lib/tiny.py"], "files": 2,
                    "train_tokens": len(splits["lib/core.py"][0]) + 2,    # + tiny.py's "x" and EOT
                    "val_tokens": len(splits["lib/core.py"][1]) + 1}}}
    assert 258 < tok.vocab_size <= 300 and meta["bytes"] == 1052
    assert f"4 files, 0.0 MB, bpe vocab {tok.vocab_size}: train {train:,} tokens" in capsys.readouterr().out

    run = mlflow.get_run(mlflow.last_active_run().info.run_id)
    assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "prepare"
    assert run.data.params["data.include"] == "['**/*.py']" and run.data.params["data.vocab_size"] == "300"
    assert run.data.metrics["train_tokens"] == train and run.data.metrics["domains.lib.files"] == 2


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_prepare_other_tokenizers(project, kind):
    (project / "params.yaml").write_text(PARAMS % kind)
    prepare.main([])
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    vocab = len(set("".join(DOCS[f] for f in DOCS if f.endswith(".py")))) + 1 if kind == "char" else 257
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == (kind, vocab, vocab - 1)
    n_bytes = 1052 if kind == "byte" else sum(len(DOCS[f]) for f in DOCS if f.endswith(".py"))
    assert meta["train_tokens"] + meta["val_tokens"] == n_bytes + 4


def test_second_run_is_byte_identical(project):
    prepare.main([])
    first = snapshot(project / "data/prepared")
    prepare.main([])
    assert snapshot(project / "data/prepared") == first
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared"]


def test_failed_run_leaves_previous_output(project, monkeypatch):
    prepare.main([])
    before = snapshot(project / "data/prepared")
    (project / "params.yaml").write_text((PARAMS % "bpe").replace("source: corpus", "source: gone"))
    with pytest.raises(ParamsError, match="data.source: directory .*gone does not exist"):
        prepare.main([])
    # Other params, so a writer that wrote in place would leave other bytes: a char tokenizer, other token ids.
    (project / "params.yaml").write_text(PARAMS % "char")
    monkeypatch.setattr(prepare, "corpus_sha256", lambda root, files: 1 / 0)   # fails mid-write
    with pytest.raises(ZeroDivisionError):
        prepare.main([])
    assert snapshot(project / "data/prepared") == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared"]


def test_corpus_without_validation_tokens(project):
    (project / "corpus" / "one").mkdir()
    (project / "corpus" / "one" / "x.py").write_text("x")
    (project / "params.yaml").write_text('data: {source: corpus, include: ["one/*.py"], tokenizer: byte}\n'
                                         'pretrain: {variants: {a: {}}}\n')
    with pytest.raises(ParamsError, match="no validation tokens for the corpus: every document there is shorter"):
        prepare.main([])
    assert list((project / "data").iterdir()) == []


def test_stdlib_source(project):
    (project / "params.yaml").write_text('data: {source: stdlib, include: ["json/*.py"], exclude: ["json/tool.py"], '
                                         'tokenizer: byte}\npretrain: {variants: {a: {}}}\n')
    prepare.main([])
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["source"] == "stdlib"
    assert meta["python_version"] == platform.python_version()
    assert meta["files"] == 4 and meta["domains"] == {}
    assert meta["train_tokens"] + meta["val_tokens"] == meta["bytes"] + 4    # byte tokens + one EOT per file


def test_corpus_manifest_changes_with_any_selected_byte_and_only_then(project, capsys):
    def manifest() -> str:
        corpus_stage.main([])
        return (project / "data/corpus.json").read_text()

    first = manifest()
    assert json.loads(first)["files"] == 4 and json.loads(first)["domains"] == {"app": 2, "lib": 2}
    mtime = (project / "data/corpus.json").stat().st_mtime_ns
    assert manifest() == first and (project / "data/corpus.json").stat().st_mtime_ns == mtime   # not rewritten
    assert "unchanged -> data/corpus.json" in capsys.readouterr().out.splitlines()[-1]
    app, lib = project / "corpus/app/util.py", project / "corpus/lib"
    changes = [(lambda: app.write_text(DOCS["app/util.py"] + "#\n"), lambda: app.write_text(DOCS["app/util.py"])),
               (lambda: (lib / "new.py").write_text("y = 2\n"), lambda: (lib / "new.py").unlink()),
               (lambda: app.rename(app.with_name("util2.py")), lambda: app.with_name("util2.py").rename(app))]
    for change, undo in changes:                  # edited, added, renamed: changed; undone: as before
        change()
        assert manifest() != first
        undo()
        assert manifest() == first
    (project / "corpus/README.md").write_text("not selected: no change\n")
    assert manifest() == first


def test_a_bad_corpus_writes_no_manifest(project):
    (project / "corpus/lib/bad.py").write_bytes(b"x = 1\n\xff\n")
    with pytest.raises(ParamsError, match=r"not UTF-8 text: lib/bad.py \(byte 6\)"):
        corpus_stage.main([])
    assert not (project / "data").exists()


def test_a_missing_or_truncated_token_file_is_one_message_with_the_fix(project):
    prepare.main([])
    out = project / "data/prepared"
    assert len(load_tokens(out, "domains/app/val")) == json.loads((out / "meta.json").read_text())["domains"]["app"]["val_tokens"]
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])
    with pytest.raises(ParamsError, match=r"val.bin has [\d,]+ bytes, not [\d,]+ tokens x 2 \(as .*meta.json records\): "
                                          r"restore it with `dvc checkout --force .*prepared`, or rebuild it with `dvc repro -f prepare`"):
        load_tokens(out, "val")
    (out / "domains/app/train.bin").unlink()
    with pytest.raises(ParamsError, match=r"domains/app/train.bin is missing"):
        load_tokens(out, "domains/app/train")
    (out / "meta.json").write_text("{")
    with pytest.raises(ParamsError, match=r"meta.json is missing or damaged \(JSONDecodeError"):
        load_tokens(out, "train")
