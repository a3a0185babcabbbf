"""tasks/evaluate.py's quality metrics against their definitions (docs/methods.md#metrics): val_loss, the
mean next-token NLL over non-overlapping windows; val_ppl = exp(val_loss); val_bpb = total NLL / bytes of the
scored tokens / ln 2. First on a tiny random model over made-up tokens of 1 to 4 bytes each (bytes !=
tokens); then the stage on a two-domain corpus with a BPE tokenizer: the whole split and each domain scored,
metrics/windows/<model>.csv summing to the metrics exactly, evaluate.max_tokens for a quick look.

    .venv/bin/python -m pytest tests/tasks/test_evaluate.py -q
"""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.artifacts import save_model_dir
from components.config import ModelConfig
from components.data import load_tokens
from components.errors import ParamsError
from components.model import TransformerLM
from components.tokenizer import Tokenizer
from tasks import evaluate, prepare
from tasks.evaluate import batch_context, batch_decode_speed, quality, speed, window_losses
from tests.tasks.tiny_corpus import write_domain_corpus

PARAMS = """\
study: {{name: tiny, seed: 7}}
data: {{source: corpus, include: ["**/*.txt"], domains: {{a: ["a/*.txt"], b: ["b/*.txt"]}}, tokenizer: bpe,
       vocab_size: 300, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 1, n_head: 2, n_embd: 16}}
train: {{accelerator: cpu}}
pretrain: {{variants: {{m: {{preset: serial}}, bare: {{preset: serial}}}}}}
evaluate: {{max_tokens: {max_tokens}, batch_size: 4, prompt_tokens: 8, decode_tokens: 4, speed_warmup: 0,
           speed_runs: 1}}
"""
FLOPS = {"flops_per_token": 123.0, "train_flops": 4.5e9, "total_train_flops": 6.0e9}


def reference_nll(model, tokens, token_bytes, n_windows):
    """(summed NLL, bytes) of the first n_windows non-overlapping block_size windows, in one batch."""
    T = model.cfg.block_size
    rows = torch.from_numpy(np.stack([tokens[o:o + T + 1] for o in range(0, n_windows * T, T)]).astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    return nll, int(token_bytes[y].sum())


def test_quality_metrics_follow_their_definitions():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 16, 50).astype(np.uint16)
    token_bytes = torch.tensor([1, 2, 3, 4] * 4)                 # UTF-8 length of each token id's text
    windows, available = window_losses(model, tokens, token_bytes, max_tokens=40, batch_size=2)
    m = quality(windows, available)
    # The reference: the 5 windows of 8 tokens starting at 0, 8, ..., 32, scored in one batch; the
    # split holds 6 ((50 - 1) // 8), so 5/6 of it was scored.
    nll, n_bytes = reference_nll(model, tokens, token_bytes, 5)
    assert (m["val_tokens"], m["val_bytes"], m["val_share"]) == (40, n_bytes, 5 / 6) and n_bytes > 40
    assert m["val_loss"] == pytest.approx(nll / 40, rel=1e-5)
    assert m["val_ppl"] == pytest.approx(math.exp(nll / 40), rel=1e-5)
    assert m["val_bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    # each window on its own: the same sums, window by window
    for i, (n, b, loss) in enumerate(windows):
        assert (n, b) == (8, reference_nll(model, tokens[i * 8:], token_bytes, 1)[1])
        assert loss == pytest.approx(reference_nll(model, tokens[i * 8:], token_bytes, 1)[0], rel=1e-5)
    # null: every window
    assert quality(*window_losses(model, tokens, token_bytes, None, 4))["val_tokens"] == 48


def save_model(root, name, extra=None):
    """A tiny random model in models/<name>, as pretrain would leave it (meta: its lineage, and `extra`)."""
    torch.manual_seed(0)
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    model = TransformerLM(ModelConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)         # away from the near-uniform start: windows differ
    save_model_dir(root / "models" / name, model, {"stage": "pretrain", "parents": [], "data_sha256": meta["sha256"],
                                                   "params_hash": "s" * 16, "tokens_seen": 1000, "steps": 1,
                                                   **(extra or {})})
    return model.eval()


@pytest.fixture
def project(tmp_path, monkeypatch):
    write_domain_corpus(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.format(max_tokens="null"))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    model = save_model(tmp_path, "m", FLOPS)
    save_model(tmp_path, "bare")
    return tmp_path, model


def read_windows(root, name) -> dict[str, list[dict]]:
    """metrics/windows/<name>.csv as split -> its rows (tokens, bytes as ints, loss as a float), checking the header."""
    with open(root / "metrics/windows" / f"{name}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["split", "window", "tokens", "bytes", "loss"]
        out = {}
        for row in reader:
            out.setdefault(row["split"], []).append({"window": int(row["window"]), "tokens": int(row["tokens"]),
                                                     "bytes": int(row["bytes"]), "loss": float(row["loss"])})
    return out


def test_evaluate_scores_the_whole_split_and_each_domain(project):
    root, model = project
    evaluate.main(["m"])
    metrics = json.loads((root / "metrics/m.json").read_text())
    token_bytes = torch.tensor(Tokenizer.load(root / "data/prepared/tokenizer.json").token_bytes())
    splits = {"all": "val", "a": "domains/a/val", "b": "domains/b/val"}
    for split, path in splits.items():
        tokens = load_tokens(root / "data/prepared", path)
        n_windows = (len(tokens) - 1) // 32                     # every window, none left out
        nll, n_bytes = reference_nll(model, tokens, token_bytes, n_windows)
        prefix = "" if split == "all" else f"domain.{split}."
        assert metrics[prefix + "val_tokens"] == n_windows * 32 > len(tokens) - 33
        assert metrics[prefix + "val_loss"] == pytest.approx(nll / (n_windows * 32), rel=1e-5)
        assert metrics[prefix + "val_bpb"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
        assert n_bytes > n_windows * 32                          # BPE: tokens of several bytes
    assert metrics["val_share"] == 1.0
    assert metrics["domain.a.val_loss"] != metrics["domain.b.val_loss"]        # the domains' words differ
    assert {k: metrics[k] for k in FLOPS} == FLOPS                              # copied from meta.json
    # the generation cache: 1 layer x 2 kv heads x head size 8 x (k, v) x 4 bytes a token; no SSM state
    assert (metrics["kv_cache_bytes_per_token"], metrics["state_bytes_per_sequence"]) == (1 * 2 * 8 * 2 * 4, 0)
    assert metrics["decode_batch_tokens_per_s"] > 0 and metrics["decode_tokens_per_s"] > 0
    assert metrics["decode_compiled"] is False                                  # evaluate.compile's default
    # the windows file holds every scored window, and its sums give the metrics bit for bit
    windows = read_windows(root, "m")
    assert list(windows) == list(splits)
    for split, rows in windows.items():
        prefix = "" if split == "all" else f"domain.{split}."
        assert [r["window"] for r in rows] == list(range(len(rows))) and {r["tokens"] for r in rows} == {32}
        loss, tokens, n_bytes = (sum(r[k] for r in rows) for k in ("loss", "tokens", "bytes"))
        assert tokens == metrics[prefix + "val_tokens"]
        assert loss / tokens == metrics[prefix + "val_loss"]
        assert loss / n_bytes / math.log(2) == metrics[prefix + "val_bpb"]
    assert (sum(r["bytes"] for r in windows["all"]), metrics["val_ppl"]) == (metrics["val_bytes"],
                                                                            math.exp(metrics["val_loss"]))
    # a model whose meta.json has no FLOPs gets none
    evaluate.main(["bare"])
    assert not set(FLOPS) & set(json.loads((root / "metrics/bare.json").read_text()))


def test_max_tokens_scores_the_start_and_says_how_much(project):
    root, _ = project
    evaluate.main(["m"])
    full = read_windows(root, "m")
    (root / "params.yaml").write_text(PARAMS.format(max_tokens=100))     # 3 windows of 32 in each split
    evaluate.main(["m"])
    metrics, windows = json.loads((root / "metrics/m.json").read_text()), read_windows(root, "m")
    for split, rows in windows.items():                         # the full run's first three windows
        assert [(r["window"], r["tokens"], r["bytes"]) for r in rows] == [
            (r["window"], r["tokens"], r["bytes"]) for r in full[split][:3]]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full[split][:3]], rel=1e-6)
    assert (metrics["val_tokens"], metrics["domain.a.val_tokens"], metrics["domain.b.val_tokens"]) == (96, 96, 96)
    assert metrics["val_share"] == 3 / len(full["all"]) < 1
    assert metrics["val_loss"] == sum(r["loss"] for r in windows["all"]) / 96

    (root / "params.yaml").write_text(PARAMS.format(max_tokens=31))
    with pytest.raises(ParamsError, match=r"evaluate.max_tokens=31 is less than one window of the model's "
                                          r"block_size 32: raise it, or set it to null"):
        evaluate.main(["m"])


def test_a_domain_named_all_is_refused_before_any_compute(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(PARAMS.format(max_tokens="null").replace('a: ["a/*.txt"]',
                                                                                   'all: ["a/*.txt"]'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="data.domains.all: .* rename it"):
        evaluate.main(["m"])
    assert not (tmp_path / "metrics").exists()


def test_compiled_decode_speeds_step_through_the_compiled_step():
    """evaluate.compile: both decode measurements take every token through compiled_step (stood in for by the
    eager step it compiles: tests/components/test_model.py compiles it), its compilation run untimed."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    batches = []
    model._compiled_step = lambda idx, cache, positions: batches.append(idx.size(0)) or model.step(idx, cache, positions)
    metrics = speed(model, torch.zeros(1, 4, dtype=torch.long), 3, warmup=0, runs=2, compile=True)
    metrics |= batch_decode_speed(model, torch.zeros(3, 5, dtype=torch.long), 3, warmup=1, runs=1, compile=True)
    assert list(metrics) == ["prefill_tokens_per_s", "decode_tokens_per_s", "decode_batch_tokens_per_s"]
    assert all(v > 0 for v in metrics.values())
    assert batches == [1] * 3 * (1 + 2) + [3] * 3 * (1 + 1 + 1)   # 3 tokens a run: compile + warm-up + timed runs


def test_batch_decode_takes_distinct_windows_and_must_fit_the_context():
    val = np.arange(1000, dtype=np.uint16)
    context = batch_context(val, 4, 10)
    assert context.shape == (4, 10) and context.dtype == torch.int64
    assert context[:, 0].tolist() == [0, 247, 495, 742] and (context[:, 1:] - context[:, :-1] == 1).all()
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    speed = batch_decode_speed(model, torch.zeros(3, 5, dtype=torch.long), 3, warmup=0, runs=1)
    assert list(speed) == ["decode_batch_tokens_per_s"] and speed["decode_batch_tokens_per_s"] > 0
    with pytest.raises(ParamsError, match=r"evaluate.decode_context \+ evaluate.decode_tokens = 9 exceeds the model's "
                                          r"block_size 8: lower decode_context \(null: prompt_tokens\) or decode_tokens"):
        batch_decode_speed(model, torch.zeros(3, 5, dtype=torch.long), 4, warmup=0, runs=1)
