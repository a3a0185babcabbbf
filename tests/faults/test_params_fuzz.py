"""Every accepted value runs: random mutations of the smoke study are either refused by validation (exit 2,
a message naming the mutated key) or every model they declare builds and takes one training step.

    python -m pytest tests/faults/test_params_fuzz.py

One mutation per example (so the message can be checked against it): a value replaced by a random int,
float, string, bool or null (huge, negative, zero, .inf, .nan included), a key deleted, an unknown key
added, or a model renamed. Validation runs as `python -m tasks.validate` does, in-process. A passing study
goes through the stages' own code path: study.variant_config / student_config / stage_train, the
upcycle's config_fields, L.seed_everything(study.seed), LitLM's loss and configure_optimizers (lr, betas,
weight decay, warmup and cosine), StepBatches(seed) for the batch, grad_clip. A model too big for a CPU
step (STEP_BUDGET) takes its step on the meta device: shapes and dtypes only, no memory, no arithmetic;
an MoE that big is only built there (its routing counts tokens per expert, data the meta device has not).

The study is a subset of tests/smoke/params.yaml: three variants, one branch, the sparse upcycle and the
student (compress entries need their stage's pruning or fusion to have a config, so they are left out).
derandomize=True: the examples are a function of this file, so CI and a laptop try the same ones.
"""
import contextlib
import io
import math
import sys
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from components.config import ModelConfig
from components.data import StepBatches
from components.errors import cli
from components.lit import LitLM
from components.model import TransformerLM
from components.params import Study, load_study
from tasks import validate

SMOKE = Path(__file__).resolve().parents[1] / "smoke" / "params.yaml"
KEEP = {"pretrain": ("serial", "parallel", "hybrid"), "branch": ("parallel-lib",),
        "upcycle": ("parallel-sparse",), "distill": ("serial-kd",)}
STEP_BUDGET = 2e9             # parameters x tokens of one step on CPU (~0.1 s); bigger ones step on the meta device
EXAMPLES = 150                # ~30 s on two busy cores (one torch thread)


def base_study() -> dict:
    raw = YAML(typ="safe", pure=True).load(SMOKE.read_text())
    raw["pretrain"]["variants"] = {k: raw["pretrain"]["variants"][k] for k in KEEP["pretrain"]}
    for section in ("branch", "upcycle", "distill"):
        raw[section] = {k: raw[section][k] for k in KEEP[section]}
    raw["compress"], raw["report"] = {}, {"comparisons": [["parallel", "serial"]]}
    raw["study"].pop("replicas_of", None)   # one seed: the mutations are of the models, not of their seeds
    raw["import"] = {}                   # no checkpoints to read in the temporary study: its own bpe tokenizer
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "hf_tokenizer"} | {"tokenizer": "bpe", "vocab_size": 512}
    return raw


BASE = base_study()
# Keys a mutation may set though the smoke study leaves them to their defaults: every model field
# (on `model` and on one variant), the train options it omits, each stage's own options.
MODEL_KEYS = [f for f in Study.model_fields["model"].annotation.model_fields]
EXTRA = ([("model", k) for k in MODEL_KEYS] + [("pretrain", "variants", "serial", k) for k in MODEL_KEYS]
         + [("train", k) for k in ("beta1", "beta2")]
         + [("upcycle", "parallel-sparse", k) for k in ("expert_noise", "moe_every", "aux_loss_coef", "z_loss_coef")]
         + [("distill", "serial-kd", k) for k in ("alpha", "temperature", "hidden_weight")]
         + [("distill", "serial-kd", "student", k) for k in ("n_embd", "n_head", "block_size")])


def paths(node, prefix=()) -> list[tuple]:
    """Every key path of a mapping, sections and leaves (list items excluded: a whole list is one value)."""
    out = []
    for k, v in node.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += paths(v, prefix + (k,))
    return out


def get(node, path):
    for k in path:
        node = node[k]
    return node


PATHS = paths(BASE)
LEAVES = sorted({p for p in PATHS if not isinstance(get(BASE, p), dict)} | set(EXTRA))
MAPPINGS = [()] + [p for p in PATHS if isinstance(get(BASE, p), dict)]
NAMED = [(s, n) for s in ("branch", "upcycle", "distill") for n in BASE[s]] + \
        [("pretrain", "variants", n) for n in BASE["pretrain"]["variants"]]

VALUES = st.one_of(
    st.integers(), st.integers(-2, 300),
    st.sampled_from([0, -1, 2**31, 2**32, 2**32 - 1, 2**63, 2**64, 10**20, 99999999999999999999]),
    st.floats(), st.floats(-2.0, 2.0), st.sampled_from([0.0, -0.0, 1e-300, 1e308, 0.5, 0.999]),
    st.text(max_size=6), st.booleans(), st.none())
NAMES = st.text(alphabet="abc-_/. 0", min_size=0, max_size=8)


@st.composite
def mutations(draw):
    """(description, the keys a refusal may name, the mutated study): one to three mutations, so 150 examples
    reach most of the ~150 keys; a refusal must name at least one of them."""
    raw, descriptions, keys = base_copy(), [], []
    for _ in range(draw(st.integers(1, 3))):
        try:
            description, named = mutate(draw, raw)
        except (KeyError, TypeError, AttributeError):   # an earlier mutation removed or replaced its place
            continue
        descriptions.append(description)
        keys += named
    return "; ".join(descriptions), keys, raw


def mutate(draw, raw: dict) -> tuple[str, list]:
    """Mutate `raw` in place: (description, the keys a refusal may name). A deleted entry may be named by
    what needed it (the `branch` entry an upcycle's parent needs) or by what it held, so any key on its
    path or under it counts."""
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown", "rename"]))
    if kind == "set":
        path, value = draw(st.sampled_from(LEAVES)), draw(VALUES)
        parent = raw
        for k in path[:-1]:
            parent = parent.setdefault(k, {}) if isinstance(parent.get(k, {}), dict) else parent[k]
        if not isinstance(parent, dict):                # an earlier mutation set a section to a value
            raise TypeError(path)
        parent[path[-1]] = value
        return f"{'.'.join(path)} = {value!r}", [path[-1]]
    if kind == "delete":
        path = draw(st.sampled_from(PATHS))
        gone = get(raw, path[:-1]).pop(path[-1])       # a message may name what was in it (data: its domains)
        return f"delete {'.'.join(path)}", list(path) + [p[-1] for p in (paths(gone) if isinstance(gone, dict) else [])]
    if kind == "unknown":
        path, key = draw(st.sampled_from(MAPPINGS)), draw(st.sampled_from(["bogus", "n_embed", "seeds", "lr_min"]))
        get(raw, path)[key] = draw(VALUES)
        return f"add unknown key {'.'.join(path + (key,))}", [key]
    path, new = draw(st.sampled_from(NAMED)), draw(NAMES)
    entries = get(raw, path[:-1])
    entries[new] = entries.pop(path[-1])
    return f"rename {'.'.join(path)} -> {new!r}", [path[-1], new]


def base_copy() -> dict:
    return YAML(typ="safe", pure=True).load(io.StringIO(dump(BASE)))


def dump(raw: dict) -> str:
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(raw, out)
    return out.getvalue()


def run_validate() -> tuple[int, str]:
    """`python -m tasks.validate` in the current directory, in-process: (exit code, stderr)."""
    err, argv = io.StringIO(), sys.argv
    sys.argv = ["validate"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli(validate.main)
        return 0, err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()
    finally:
        sys.argv = argv


def models(study: Study) -> dict:
    """name -> (config, train params) of every model the study declares, as their stages resolve them."""
    vocab = study.data.vocab_size if study.data.tokenizer == "bpe" else 257
    out = {name: (study.variant_config(name, vocab), study.train) for name in study.pretrain.variants}
    for name, b in study.branch.items():
        out[name] = (out[b.parent][0], study.stage_train(b))
    for name, u in study.upcycle.items():
        n = len(u.experts(study.branches_of(u.parent)))
        cfg = out[u.parent][0] if not n else replace(out[u.parent][0], **u.config_fields(n))
        out[name] = (cfg, study.stage_train(u))
    for name, d in study.distill.items():
        out[name] = (study.student_config(name, out[d.teacher][0]), study.stage_train(d))
    return out


def one_step(cfg: ModelConfig, train, seed: int) -> None:
    """One optimizer step of a new model, as pretrain's first: seeded init, the stage's batch, LitLM's
    loss and optimizer; on the meta device when it is too big for this test (see the module docstring)."""
    L.seed_everything(seed, verbose=False)
    with torch.device("meta"):
        n_params = TransformerLM(cfg).num_params()
    on_meta = n_params * train.batch_size * cfg.block_size > STEP_BUDGET
    if on_meta and cfg.n_expert:
        return
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        lit = LitLM(cfg, train)
    if on_meta:
        x = torch.zeros(train.batch_size, cfg.block_size, dtype=torch.long, device="meta")
        y = x
    else:
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2 * cfg.block_size + 2, dtype=np.int64)
        x, y = StepBatches(tokens, cfg.block_size, train.batch_size, seed)[0]
    opt = lit.configure_optimizers()
    out = lit.training_step((x, y), 0)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    if train.grad_clip:
        torch.nn.utils.clip_grad_norm_(lit.parameters(), train.grad_clip)
    opt["optimizer"].step()
    opt["lr_scheduler"]["scheduler"].step()
    assert on_meta or math.isfinite(loss.item())


@pytest.fixture
def study_dir(tmp_path_factory, monkeypatch):
    """An empty project directory to run in, and one torch thread: tiny steps on shared cores are
    several times faster without thread contention."""
    path, threads = tmp_path_factory.mktemp("fuzz"), torch.get_num_threads()
    monkeypatch.chdir(path)
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


# function_scoped_fixture: study_dir and fault are set up once for all examples, which is what is meant
# (each example overwrites params.yaml; fault appends to the test's ledger).
@pytest.mark.filterwarnings("ignore:You are trying to")   # LitLM's step, outside a Trainer
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=mutations())
def test_every_mutation_is_refused_by_name_or_runs(mutation, study_dir, fault):
    description, keys, raw = mutation
    fault(f"params mutation: {description}")
    (study_dir / "params.yaml").write_text(dump(raw))
    code, err = run_validate()
    if code != 0:
        assert code == 2 and err.startswith("error: "), (description, code, err)
        assert any(str(k) in err for k in keys), f"{description}: the refusal names none of {keys}:\n{err}"
        return
    study = load_study()
    for name, (cfg, train) in models(study).items():
        one_step(cfg, train, study.study.seed)
