"""components/harness.py, the lm-eval adapter, against direct forward passes of tiny random models with
a char tokenizer (token ids = characters, so text and ids map one to one): log-likelihoods (also past
block_size), greediness, rolling windows, greedy generation with stop strings, other presets; lm-eval's
simple_evaluate on the local tasks of tests/data/lm_eval; the evaluate stage's lm_eval.* metrics; the
command line.

    .venv/bin/python -m pytest tests/components/test_harness.py -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from components.artifacts import save_model_dir  # noqa: E402
from components.config import ModelConfig  # noqa: E402
from components.errors import ParamsError  # noqa: E402
from components.harness import ArchflowLM, fit  # noqa: E402
from components.model import TransformerLM  # noqa: E402
from components.tokenizer import EOT, train_tokenizer  # noqa: E402
from tasks import evaluate, prepare, report  # noqa: E402
from tests.tasks.tiny_corpus import write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests/data/lm_eval"
MC = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
TEXTS = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines()]
T = 48                                                        # block_size: the long text needs several windows


@pytest.fixture(scope="module")
def tok():
    """A char tokenizer covering the task files (and the prompts below)."""
    return train_tokenizer("char", [line["context"] + " " + " ".join(line["choices"]) for line in MC] + TEXTS, 0)


def tiny_model(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=32) | kw
    model = TransformerLM(ModelConfig(**cfg)).eval()
    with torch.no_grad():                                     # spread the logits: greedy choices are clear
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model


@pytest.fixture(scope="module")
def lm(tok):
    return ArchflowLM(model=tiny_model(tok.vocab_size), tokenizer=tok, batch_size=3, device="cpu")


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def per_token_logprob(model, ids: list[int], n: int) -> float:
    """log p of the last n of ids, each token by its own forward pass over all tokens before it."""
    return sum(F.log_softmax(model(torch.tensor([ids[:j]]))[0, -1], -1)[ids[j]].item() for j in range(len(ids) - n, len(ids)))


def test_loglikelihood_is_the_sum_of_direct_log_probs(lm, tok):
    pairs = [("The cat sat on the", " mat"), ("Two plus two equals", " four and more"), ("Rain", " falls from the sky")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (score, _) in zip(pairs, got):
        ids = tok.encode(context + continuation)
        assert len(ids) <= T + 1
        assert score == pytest.approx(per_token_logprob(lm.model, ids, len(continuation)), abs=1e-5)
    assert all(score < -1 for score, _ in got)


def test_a_context_longer_than_block_size_is_left_truncated(lm, tok):
    context, continuation = TEXTS[1][:110].rstrip(), " the sun"
    ids = tok.encode(context + continuation)
    assert len(ids) > 2 * T
    [(score, _)] = lm.loglikelihood([req("loglikelihood", context, continuation)])
    window = ids[-(T + 1):]                                   # lm-eval's hf: one window, the last block_size + 1 tokens
    with torch.no_grad():
        logprobs = F.log_softmax(lm.model(torch.tensor([window[:-1]]))[0], -1)
    direct = sum(logprobs[T - 8 + i, window[T - 8 + i + 1]].item() for i in range(8))
    assert score == pytest.approx(direct, abs=1e-5)
    assert score != pytest.approx(per_token_logprob(lm.model, ids[-(T + 1) + 3:], 8), abs=1e-3)   # context matters


def test_is_greedy(lm, tok):
    context = tok.encode("She wrote the letter")
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(lm.model(torch.tensor([context + greedy]))[0, -1].argmax().item())
    other = greedy[:2] + [(greedy[2] + 1) % tok.vocab_size]
    (s1, g1), (s2, g2) = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert (g1, g2) == (True, False) and s1 > s2


def test_loglikelihood_rolling_covers_every_token_once(lm, tok):
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", text) for text in TEXTS])
    for text, score in zip(TEXTS, got):
        seq = [tok.eot_id] + tok.encode(text)                 # seq[j + 1] is predicted from seq[:j + 1]
        direct = 0.0
        for s in range(0, len(seq) - 1, T):                   # targets seq[s+1 .. e]: windows of block_size tokens,
            e = min(s + T, len(seq) - 1)                      # the last one reading block_size tokens back
            with torch.no_grad():
                logprobs = F.log_softmax(lm.model(torch.tensor([seq[max(0, e - T):e]]))[0], -1)
            n = logprobs.size(0)
            direct += sum(logprobs[n - (e - s) + i, seq[s + 1 + i]].item() for i in range(e - s))
        assert score == pytest.approx(direct, abs=1e-4)
    assert len(tok.encode(TEXTS[1])) > 3 * T                  # several windows, the last one partial


@torch.no_grad()
def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    for _ in range(n):
        ids.append(model(torch.tensor([ids[-T:]]))[0, -1].argmax().item())
    return tok.decode(ids[len(tok.encode(prompt)):])


def test_generate_until_is_the_greedy_loop_and_stops(lm, tok):
    prompts = ["The cat sat", "Fish swim i", "Ice is"]        # two of one length: generated as one batch
    refs = [greedy_text(lm.model, tok, p, 10) for p in prompts]
    calls = []
    hook = lm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = lm.generate_until([req("generate_until", p, {"until": ["\x00"], "max_gen_toks": 10}) for p in prompts])
        assert got == [r.split(EOT)[0] for r in refs] and len(calls) == 2 * 10   # 2 batches x (prefill + 9 steps)
        stop = refs[0][3:5]                                   # a string the greedy text reaches at its 5th token
        calls.clear()
        [text] = lm.generate_until([req("generate_until", prompts[0], {"until": [stop], "max_gen_toks": 10})])
    finally:
        hook.remove()
    assert text == refs[0].split(stop)[0] and len(text) <= 3
    assert len(calls) == refs[0].index(stop) + len(stop)      # stopped: prefill + one step per further token


def test_long_prompts_keep_half_the_context():
    assert fit(list(range(100)), 256, 48) == (list(range(76, 100)), 24)   # lm-eval's default 256 new tokens
    assert fit(list(range(10)), 256, 48) == (list(range(10)), 38)         # fewer new tokens, the whole prompt
    assert fit(list(range(10)), 5, 48) == (list(range(10)), 5)


def test_sampled_generation_follows_the_seed(lm, tok):
    kwargs = {"until": ["\x00"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    texts = [ArchflowLM(model=lm.model, tokenizer=tok, seed=seed).generate_until([req("generate_until", "Rain", kwargs)])[0]
             for seed in (1, 1, 2)]
    greedy = greedy_text(lm.model, tok, "Rain", 12).split(EOT)[0]
    assert texts[0] == texts[1] and texts[0] != texts[2] and greedy not in texts


@pytest.mark.parametrize("kw", [dict(block="parallel", n_expert=4, top_k=2, n_attn_expert=2),
                                dict(block="hybrid", n_loop=2, dwa=True)], ids=["moe-moa", "hybrid-looped-dwa"])
def test_other_presets(tok, kw):
    model = tiny_model(tok.vocab_size, **kw)
    lm = ArchflowLM(model=model, tokenizer=tok, batch_size=4)
    pairs = [(line["context"], " " + line["choices"][1]) for line in MC[:4]]   # different lengths: padded batch
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (score, _) in zip(pairs, got):
        assert score == pytest.approx(per_token_logprob(model, tok.encode(context + continuation), len(continuation)),
                                      abs=1e-5)
    [text] = lm.generate_until([req("generate_until", "Bread is", {"until": ["\x00"], "max_gen_toks": 6})])
    assert text == greedy_text(model, tok, "Bread is", 6).split(EOT)[0]


def test_simple_evaluate_on_the_local_tasks_matches_the_adapter(lm, tok):
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=["archflow_tiny_mc", "archflow_tiny_rolling"], task_manager=manager,
                              log_samples=False)["results"]
    correct = correct_norm = 0
    for line in MC:
        scores = [s for s, _ in lm.loglikelihood([req("loglikelihood", line["context"], " " + c) for c in line["choices"]])]
        correct += max(range(4), key=lambda i: scores[i]) == line["answer"]
        correct_norm += max(range(4), key=lambda i: scores[i] / len(line["choices"][i])) == line["answer"]
    mc = results["archflow_tiny_mc"]
    assert 0 <= mc["acc,none"] <= 1 and mc["acc,none"] == correct / 10 and mc["acc_norm,none"] == correct_norm / 10
    assert mc["acc_stderr,none"] == pytest.approx(math.sqrt(correct / 10 * (1 - correct / 10) / 9))
    nll = -sum(lm.loglikelihood_rolling([req("loglikelihood_rolling", t) for t in TEXTS]))
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert results["archflow_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2))


def test_a_missing_tokenizer_and_a_bad_batch_size_are_one_message(tmp_path, monkeypatch):
    save_model_dir(tmp_path / "m", tiny_model(257), {"stage": "pretrain", "parents": []})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"no tokenizer at data/prepared/tokenizer.json \(the study's"):
        ArchflowLM(path="m")
    with pytest.raises(ParamsError, match="batch_size must be a positive integer or auto, not 'x'"):
        ArchflowLM(path="m", batch_size="x")


# --- the evaluate stage: evaluate.tasks -> metrics/<name>.json and the MLflow run

PARAMS = """\
study: {{name: tiny, seed: 7}}
data: {{source: corpus, include: ["*.txt"], tokenizer: byte, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 2, n_head: 2, n_embd: 32}}
train: {{max_steps: 4, batch_size: 8, warmup_steps: 2, eval_every: 1, eval_batches: 2, ckpt_every: 100,
        accelerator: cpu, devices: 1}}
pretrain: {{variants: {{serial: {{block: serial}}}}}}
evaluate: {{max_tokens: 256, prompt_tokens: 8, decode_tokens: 4, speed_warmup: 0, speed_runs: 1,
           tasks: [{tasks}], task_paths: ["{paths}"], limit: 4}}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    write_corpus(tmp_path, docs=2, words=500)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.format(tasks="archflow_tiny_mc", paths=TASKS))
    prepare.main([])
    data_sha = json.loads((tmp_path / "data/prepared/meta.json").read_text())["sha256"]
    save_model_dir(tmp_path / "models/serial", tiny_model(257, block_size=32),
                   {"stage": "pretrain", "parents": [], "data_sha256": data_sha, "params_hash": "s" * 16,
                    "tokens_seen": 1000, "steps": 1, "params": 1})
    return tmp_path


def test_evaluate_stage_writes_lm_eval_scores(project):
    evaluate.main(["serial"])
    metrics = json.loads((project / "metrics/serial.json").read_text())
    scores = {k: v for k, v in metrics.items() if k.startswith("lm_eval.")}
    assert set(scores) == {f"lm_eval.archflow_tiny_mc.{m}" for m in
                           ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "sample_len")}
    assert scores["lm_eval.archflow_tiny_mc.sample_len"] == 4 and scores["lm_eval.archflow_tiny_mc.acc"] in (0, .25, .5, .75, 1)
    assert metrics["val_loss"] > 0                            # the usual metrics are still there
    [run] = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.stage = 'evaluate'", output_format="list")
    assert run.data.metrics["lm_eval.archflow_tiny_mc.acc"] == scores["lm_eval.archflow_tiny_mc.acc"]
    (project / "metrics/train").mkdir()
    (project / "metrics/train/serial.json").write_text('{"train_seconds": 1.0, "tokens_per_s": 1000.0}')
    report.main([])                                           # the summary shows the scores, the csv has them all
    header = next(line for line in (project / "reports/summary.md").read_text().split("\n") if line.startswith("| model"))
    assert "lm_eval.archflow_tiny_mc.acc " in header and "lm_eval.archflow_tiny_mc.acc_norm " in header
    assert "stderr" not in header and "sample_len" not in header
    summary = pd.read_csv(project / "reports/summary.csv", index_col="model")
    assert summary.loc["serial", "lm_eval.archflow_tiny_mc.acc_stderr"] == scores["lm_eval.archflow_tiny_mc.acc_stderr"]


def test_tasks_without_lm_eval_installed_name_the_extra(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)   # import lm_eval.tasks raises ImportError
    with pytest.raises(ParamsError, match=r"^evaluate.tasks needs lm-evaluation-harness: pip install -e '.\[eval\]'$"):
        evaluate.main(["serial"])


def test_an_unknown_task_is_one_message_before_any_compute(project, monkeypatch):
    (project / "params.yaml").write_text(PARAMS.format(tasks="archflow_tiny_mc, no_such_task", paths=TASKS))
    monkeypatch.setattr(evaluate, "load_input", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(ParamsError) as e:
        evaluate.main(["serial"])
    assert str(e.value) == ("evaluate.tasks: 'no_such_task' is not an lm-eval task: list them with "
                            f"`lm-eval ls tasks --include_path {TASKS}`")
    assert not (project / "metrics").exists()


# --- the command line: lm-eval's own, with `archflow` registered

def test_command_line(tmp_path, tok, lm):
    model_dir, tok_file = tmp_path / "model", tmp_path / "tokenizer.json"
    save_model_dir(model_dir, lm.model, {"stage": "pretrain", "parents": []})
    tok.save(tok_file)
    r = subprocess.run([sys.executable, "-m", "components.harness", "--model", "archflow",
                        "--model_args", f"path={model_dir},tokenizer={tok_file}", "--tasks", "archflow_tiny_mc",
                        "--include_path", str(TASKS), "--limit", "3", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["archflow_tiny_mc"]["acc,none"]
    correct = 0
    for line in MC[:3]:
        scores = [s for s, _ in lm.loglikelihood([req("loglikelihood", line["context"], " " + c) for c in line["choices"]])]
        correct += max(range(4), key=lambda i: scores[i]) == line["answer"]
    assert acc == correct / 3
    assert "archflow_tiny_mc" in r.stdout and "|acc" in r.stdout
