"""params.yaml validation: every kind of bad input is named with its fix, all at once."""
from pathlib import Path

import pytest

from components.config import PRESETS
from components.errors import ParamsError
from components.params import DEFAULT_CORPUS, EvaluateParams, load_study

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = """
pretrain:
  variants:
    serial: {}
    parallel: {block: parallel}
"""


def problems(tmp_path, text: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as e:
        load_study(path)
    return str(e.value)


@pytest.mark.parametrize("path", ["params.yaml", "tests/smoke/params.yaml"])
def test_shipped_studies_are_valid(path):
    study = load_study(ROOT / path)
    assert {"serial", "parallel"} <= set(study.models())
    assert path == "params.yaml" or any(study.variant_config(n, 256).n_kv_head < study.variant_config(n, 256).n_head
                                        for n in study.pretrain.variants)   # the smoke study has a GQA variant


def test_minimal_study_gets_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text(MINIMAL)
    study = load_study(tmp_path / "params.yaml")
    assert study.data.source == DEFAULT_CORPUS and study.experiment == "archflow"
    cfg = study.variant_config("parallel", vocab_size=300)
    assert (cfg.block, cfg.vocab_size, cfg.n_kv_head) == ("parallel", 300, cfg.n_head)


def test_unknown_keys_anywhere_are_named_with_a_suggestion(tmp_path):
    msg = problems(tmp_path, MINIMAL + "bogus: 1\ntrain: {max_stepz: 3}\n"
                   "tracking: {experimnt: x}\n").replace(MINIMAL, "")
    assert "3 problems" in msg
    assert "bogus: unknown key" in msg
    assert "train.max_stepz: unknown key; did you mean 'max_steps'?" in msg
    assert "tracking.experimnt: unknown key; did you mean 'experiment'?" in msg


def test_unknown_key_inside_a_variant(tmp_path):
    msg = problems(tmp_path, MINIMAL.replace("{block: parallel}", "{blok: parallel}"))
    assert "pretrain.variants.parallel.blok: unknown key; did you mean 'block'?" in msg


@pytest.mark.parametrize("value", ['"4"', "four", "4.0", "true"])
def test_wrongly_typed_n_head(tmp_path, value):
    msg = problems(tmp_path, MINIMAL + f"model:\n  n_head: {value}\n")
    assert "model.n_head" in msg and "Write a whole number" in msg


def test_wrong_types_and_ranges(tmp_path):
    msg = problems(tmp_path, MINIMAL + "train: {lr: fast, deterministic: maybe, max_steps: 0}\n"
                   "data: {tokenizer: words, val_fraction: 0.9}\n")
    for where in ("train.lr", "train.deterministic", "train.max_steps", "data.tokenizer", "data.val_fraction"):
        assert where in msg


def test_impossible_shapes(tmp_path):
    msg = problems(tmp_path, "model: {n_embd: 96, n_head: 5}\n"
                   "pretrain:\n  variants:\n    gqa: {n_head: 4, n_kv_head: 3}\n    ok: {n_head: 4}\n")
    assert "model: n_embd=96 is not divisible by n_head=5" in msg
    assert "pretrain.variants.gqa: n_head=4 is not divisible by n_kv_head=3" in msg
    assert "pick n_kv_head among [1, 2, 4]" in msg
    assert "pretrain.variants.ok" not in msg


def test_unknown_component_names(tmp_path):
    msg = problems(tmp_path, "pretrain:\n  variants:\n    a: {block: paralel, ffn: relu}\n")
    assert "block='paralel' is unknown: use one of serial, parallel" in msg
    assert "ffn='relu' is unknown" in msg


def test_unsafe_names(tmp_path):
    msg = problems(tmp_path, "pretrain:\n  variants:\n    'a/b': {}\n    'x y': {}\n    ends-: {}\n    ok: {}\n"
                   "data:\n  domains:\n    '../up': ['*.py']\n")
    assert "pretrain.variants.a/b: the name is unsafe" in msg
    assert "pretrain.variants.x y: the name is unsafe" in msg
    assert "pretrain.variants.ends-: the name is unsafe" in msg
    assert "data.domains.../up: the name is unsafe" in msg
    assert "pretrain.variants.ok" not in msg


def test_duplicate_model_name(tmp_path):
    msg = problems(tmp_path, "pretrain:\n  variants:\n    a: {}\n    a: {n_layer: 2}\n")
    assert 'duplicate key "a"' in msg and "line 4" in msg


def test_unknown_model_in_comparisons(tmp_path):
    msg = problems(tmp_path, MINIMAL + "report:\n  comparisons:\n    - [paralel, serial]\n")
    assert "report.comparisons.0: unknown model 'paralel'; did you mean 'parallel'?" in msg
    msg = problems(tmp_path, MINIMAL + "report:\n  comparisons:\n    - [parallel, serial, x]\n")
    assert "report.comparisons.0: list should have at most 2 items" in msg


def test_speed_measurement_must_fit_the_context(tmp_path):
    msg = problems(tmp_path, MINIMAL + "model: {block_size: 32}\nevaluate: {prompt_tokens: 30, decode_tokens: 8}\n")
    assert "prompt_tokens + decode_tokens = 38 exceeds the block_size 32" in msg
    msg = problems(tmp_path, MINIMAL + "model: {block_size: 32}\nevaluate: {prompt_tokens: 8, decode_context: 28, decode_tokens: 8}\n")
    assert ("decode_context + decode_tokens = 36 exceeds the block_size 32 of 'serial': lower decode_context "
            "(null: prompt_tokens) or decode_tokens") in msg and "prompt_tokens + decode_tokens" not in msg
    fits = EvaluateParams(prompt_tokens=8, decode_context=24, decode_tokens=8)
    assert fits.length_problems(32, "of 'serial'") == [] and fits.batch_context == 24
    assert EvaluateParams(prompt_tokens=8).batch_context == 8                  # null: the prompt's length


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must be a mapping" in problems(tmp_path, "- a\n- b\n")
    with pytest.raises(ParamsError, match="not found"):
        load_study(tmp_path / "nope.yaml")
    assert "pretrain: required but missing" in problems(tmp_path, "study: {name: x}\n")


# ---------------------------------------------------------------------------------------------
# presets: resolution order and bad input

def variants(text: str) -> str:
    return "pretrain:\n  variants:\n" + "".join(f"    {line}\n" for line in text.strip().splitlines())


def test_preset_resolution_order(tmp_path):
    """ModelConfig defaults <- model <- preset <- the variant's own keys."""
    (tmp_path / "params.yaml").write_text("model: {n_loop: 3, n_layer: 3, block: parallel}\n" + variants("""
looped: {preset: looped}
looped4: {preset: looped, n_loop: 4}
par: {preset: par}
plain: {}
"""))
    study = load_study(tmp_path / "params.yaml")
    cfg = {n: study.variant_config(n, 300) for n in study.models()}
    assert (cfg["looped"].block, cfg["looped"].n_loop, cfg["looped"].n_layer) == ("serial", 2, 3)
    assert cfg["looped4"].n_loop == 4
    assert (cfg["par"].block, cfg["par"].layout, cfg["par"].n_loop) == ("par", "sfffff", 3)
    assert (cfg["plain"].block, cfg["plain"].n_loop) == ("parallel", 3)


def test_every_preset_is_in_the_smoke_study_under_its_name():
    study = load_study(ROOT / "tests/smoke/params.yaml")
    for name, fields in PRESETS.items():
        assert study.pretrain.variants[name].preset == name
        cfg = study.variant_config(name, 256)
        assert all(getattr(cfg, k) == v for k, v in fields.items())


def test_unknown_preset_suggests_the_closest(tmp_path):
    msg = problems(tmp_path, variants("a: {preset: paralel}\nb: {preset: xyz}\nc: {preset: par}"))
    assert "pretrain.variants.a: preset='paralel' is unknown: did you mean 'parallel'?" in msg
    assert "pretrain.variants.b: preset='xyz' is unknown: presets are serial, parallel," in msg
    assert "pretrain.variants.c" not in msg
    assert "model.preset: unknown key" in problems(tmp_path, "model: {preset: par}\n" + variants("a: {}"))


def test_bad_layouts(tmp_path):
    msg = problems(tmp_path, "model: {n_layer: 2}\n" + variants("""
letters: {preset: par, layout: sfxf}
short: {preset: par, layout: sfs}
long: {preset: par, layout: sfsfff}
not-par: {layout: sfsf}
ok: {preset: par, layout: ffss}
"""))
    assert "pretrain.variants.letters: layout='sfxf' has letters other than s and f" in msg
    assert "pretrain.variants.short: layout='sfs' has 3 sublayers but n_layer=2 needs 4 (two per layer), " \
           "e.g. 'sfff'" in msg
    assert "pretrain.variants.long: layout='sfsfff' has 6 sublayers" in msg
    assert "pretrain.variants.not-par: layout='sfsf' is only read by block=par" in msg
    assert "pretrain.variants.ok" not in msg


def test_bad_loops_dwa_and_state(tmp_path):
    msg = problems(tmp_path, variants("""
loops: {preset: looped, n_loop: 0}
dwa: {preset: denseformer, dwa_dilation: 0, dwa_period: -1}
dwa-off: {dwa_dilation: 2}
dwa-far: {preset: denseformer, n_layer: 2, n_loop: 2, dwa_period: 5}
state: {preset: hybrid, d_state: 0}
state-unread: {preset: serial, d_state: 8}
"""))
    assert "pretrain.variants.loops: n_loop=0 must be >= 1" in msg
    assert "pretrain.variants.dwa: dwa_dilation=0 must be >= 1" in msg
    assert "pretrain.variants.dwa: dwa_period=-1 must be >= 1" in msg
    assert "pretrain.variants.dwa-off: dwa_dilation and dwa_period are only read with dwa: true" in msg
    assert "pretrain.variants.dwa-far: dwa_period=5 exceeds the 4 block applications" in msg
    assert "pretrain.variants.state: d_state=0 must be >= 1" in msg
    assert "pretrain.variants.state-unread: d_state=8 is only read by block=hybrid" in msg


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shapes_that_do_not_divide_are_named_for_every_preset(tmp_path, preset):
    msg = problems(tmp_path, "model: {n_embd: 96}\n" + variants(f"a: {{preset: {preset}, n_head: 5}}\n"
                                                                 f"b: {{preset: {preset}, n_head: 4, n_kv_head: 3}}"))
    assert "pretrain.variants.a: n_embd=96 is not divisible by n_head=5" in msg
    assert "pretrain.variants.b: n_head=4 is not divisible by n_kv_head=3: pick n_kv_head among [1, 2, 4]" in msg


def test_preset_of_the_wrong_type(tmp_path):
    msg = problems(tmp_path, variants("a: {preset: 3}"))
    assert "pretrain.variants.a.preset: input should be a valid string" in msg


def test_a_stage_lr_below_min_lr_is_rejected_on_the_merged_values(tmp_path):
    """train: {lr: 1e-3, min_lr: 1e-4}; a branch's own lr 5e-5 would decay *up* to train's min_lr."""
    base = MINIMAL + "data: {domains: {d: ['*.py']}}\n"
    msg = problems(tmp_path, base + "branch:\n  b: {parent: serial, domain: d, lr: 5.0e-5}\n"
                   "  c: {parent: serial, domain: d, min_lr: 2.0e-3}\n  ok: {parent: serial, domain: d, lr: 5.0e-5, "
                   "min_lr: 1.0e-5}\n")
    assert "branch.b.lr: 5e-05 is below train.min_lr=0.0001" in msg and "also set branch.b.min_lr <= 5e-05" in msg
    assert "branch.c.min_lr: 0.002 exceeds train.lr=0.001: lower min_lr, or set branch.c.lr" in msg
    assert "branch.ok" not in msg


def test_method_entries_report_at_the_users_key_path(tmp_path):
    """upcycle and compress entries are one class per method: errors name params.yaml's keys (not pydantic's
    union tag, compress.x.prune.fraction), the allowed methods, and which method reads a misplaced option."""
    msg = problems(tmp_path, MINIMAL + "compress:\n  a: {source: serial, method: prune, fraction: 1.5}\n"
                   "  b: {source: serial, method: prun}\n  c: {source: serial}\n"
                   "  d: {source: serial, method: int8, criterion: wanda, lr: 0.1}\n"
                   "  e: {source: serial, method: prune, fraction: 0.2, fractoin: 0.3}\n")
    assert "compress.a.fraction: 1.5 is outside [0, 1); fraction is the share" in msg and ".prune." not in msg
    assert "compress.b.method: unknown method 'prun'; did you mean 'prune'? methods are int8, prune, ffn_fusion" in msg
    assert "compress.c.method: required but missing. Add it: one of int8, prune, ffn_fusion" in msg
    assert "compress.d.criterion: only read by method prune, not int8: remove it" in msg
    assert "compress.d.lr: int8 does not train, so nothing reads lr: remove it" in msg
    assert "compress.e.fractoin: unknown key; did you mean 'fraction'?" in msg


def test_upcycle_moe_options_are_checked_by_model_config(tmp_path):
    """The MoE options are ModelConfig's fields: their values are checked on the config the stage would build."""
    study = MINIMAL + "data: {domains: {d: ['*.py']}}\nbranch: {b: {parent: parallel, domain: d}}\n"
    msg = problems(tmp_path, study + "upcycle: {u: {parent: parallel, method: sparse, router: switch, moe_every: 9}}\n")
    assert "upcycle.u: router='switch' is unknown: use one of topk-softmax, softmax-topk" in msg
    assert "upcycle.u: moe_every=9 must be between 1 and n_layer=4" in msg
    msg = problems(tmp_path, study + "upcycle: {v: {parent: parallel, method: continue, moa: kv-shared}}\n")
    assert "upcycle.v.moa: only read by method bam, not continue: remove it" in msg
    (tmp_path / "params.yaml").write_text(study + "upcycle: {w: {parent: parallel, method: bam, keep_parent: true}}\n")
    w = load_study(tmp_path / "params.yaml").upcycle["w"]
    assert w.experts(["b"]) == ["b", "parallel"] and w.config_fields(2)["n_attn_expert"] == 2


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", "4294967296"])
def test_a_seed_outside_the_seeding_range_is_named(tmp_path, seed):
    msg = problems(tmp_path, MINIMAL + f"study: {{seed: {seed}}}\n")
    assert "study.seed" in msg and "4294967295" in msg, msg


def test_the_largest_seed_is_accepted(tmp_path):
    (tmp_path / "params.yaml").write_text(MINIMAL + "study: {seed: 4294967295}\n")
    assert load_study(tmp_path / "params.yaml").study.seed == 2**32 - 1


@pytest.mark.parametrize("section, expected", [
    ("study: {seed: 99999999999999999999}", "study.seed: 99999999999999999999 is outside [0, 4294967295]; "
                                            "seed is the seed of lightning's seed_everything"),
    ("study: {seed: -1}", "study.seed: -1 is outside [0, 4294967295]"),
    ("model: {n_embd: 1000000000}", "model.n_embd: 1000000000 must be <= 65536"),
    ("model: {block_size: 100000000}", "model.block_size: 100000000 must be <= 1048576"),
    ("model: {n_layer: 5000}", "model.n_layer: 5000 must be <= 1024"),
    ("model: {d_ff: 10000000000}", "model.d_ff: 10000000000 must be <= 1048576"),
    ("model: {rope_base: -10000.0}", "model.rope_base: -10000.0 must be > 0"),
    ("model: {norm_eps: 0.0}", "model.norm_eps: 0.0 must be > 0"),
    ("model: {layer_d_ff: [4000000000]}", "model.layer_d_ff.0: input should be less than or equal to 1048576"),
    ("train: {lr: .inf}", "train.lr: input should be a finite number, got inf (float). Write a finite number"),
    ("train: {weight_decay: .nan}", "train.weight_decay: input should be a finite number"),
    ("train: {batch_size: 10000000}", "train.batch_size: 10000000 is outside [1, 1048576]"),
    ("train: {max_steps: 100000000000}", "train.max_steps: 100000000000 is outside [1, 1000000000]"),
    ("train: {devices: 0}", "train.devices: 0 is not a device count: use a count in [1, 65536], -1 (all of them)"),
    ("train: {devices: -5}", "train.devices: -5 is not a device count"),
    ("evaluate: {threads: 1000000}", "evaluate.threads: 1000000 is outside [0, 1024]"),
    ("evaluate: {speed_runs: 100000}", "evaluate.speed_runs: 100000 is outside [1, 1000]"),
])
def test_values_the_runtime_cannot_take_are_named(tmp_path, section, expected):
    msg = problems(tmp_path, MINIMAL + section + "\n")
    assert "1 problem)" in msg and expected in msg


def test_model_size_is_bounded_as_a_whole(tmp_path):
    """Each field within its bound, their product absurd: one message under `model`, not one per variant."""
    msg = problems(tmp_path, MINIMAL + "model: {n_layer: 1024, n_embd: 65536, n_head: 64}\n")
    assert "1 problem)" in msg
    assert "model: about 5.3e+13 parameters (n_layer=1024, n_embd=65536" in msg and "shrink the model" in msg


def test_unbounded_fusion_runs_are_refused_before_any_set_is_built(tmp_path):
    """A source that is not a pretrain variant has no known depth: runs were checked by building the set of
    their layers, so [0, 10**11] hung validation."""
    msg = problems(tmp_path, MINIMAL + "distill:\n  kd: {teacher: serial, student: {n_layer: 1}}\n"
                   "compress:\n  f: {source: kd, method: ffn_fusion, runs: [[0, 100000000000]]}\n")
    assert "compress.f.runs.0.1: input should be less than or equal to 1024" in msg


def test_upcycle_experts_are_bounded(tmp_path):
    msg = problems(tmp_path, MINIMAL + "upcycle:\n  s: {parent: serial, method: sparse, n_expert: 100000}\n")
    assert "upcycle.s.n_expert: 100000 is outside [1, 1024]" in msg


LINEAGE = MINIMAL + """
data: {domains: {lib: ["*.py"]}}
branch: {parallel-lib: {parent: parallel, domain: lib}}
upcycle: {parallel-btx: {parent: parallel, method: btx, keep_parent: true, top_k: 2}}
distill: {kd: {teacher: serial}}
compress: {serial-int8: {source: serial, method: int8}}
"""


def test_replicate_seeds_make_one_model_per_seed_and_follow_the_lineage(tmp_path):
    (tmp_path / "params.yaml").write_text(LINEAGE + "study: {seed: 7, replicas: [2, 3], replicas_of: {parallel: [2]}}\n")
    study = load_study(tmp_path / "params.yaml")
    models = study.models()
    assert study.instances("serial") == {7: "serial", 2: "serial-s2", 3: "serial-s3"}
    assert study.instances("parallel") == {7: "parallel", 2: "parallel-s2"}      # its own replicas
    assert study.instances("parallel-btx") == {7: "parallel-btx", 2: "parallel-btx-s2"}   # what its parent has
    assert models["parallel-btx-s2"] | {"dir": None} == {
        "stage": "upcycle", "entry": "parallel-btx", "seed": 2, "parents": ["parallel-s2", "parallel-lib-s2"],
        "dir": None, "group": "upcycle-replica"}
    assert models["parallel-lib-s2"]["dir"] == "branches/parallel-s2/parallel-lib-s2"
    assert models["kd-s3"]["parents"] == ["serial-s3"] and models["serial-int8-s3"]["parents"] == ["serial-s3"]
    assert models["serial"]["group"] == "pretrain" and models["serial"]["seed"] == 7
    assert study.stage_of("kd-s3") == "distill-replica@kd-s3"
    assert set(study.replica_plan()["evaluate"]) == {n for n, m in models.items()
                                                    if m["seed"] != 7 and m["stage"] != "branch"}


@pytest.mark.parametrize("study, expected", [
    ("{replicas: [2, 2]}", "study.replicas: [2, 2] repeats a seed"),
    ("{seed: 5, replicas: [5]}", "study.replicas: 5 is study.seed"),
    ("{replicas_of: {serail: [2]}}", "study.replicas_of.serail: unknown model 'serail'; did you mean 'serial'?"),
    ("{replicas: [-1]}", "study.replicas.0: input should be greater than or equal to 0, got -1"),
    ("{replicas_of: {parallel: [2, 3], parallel-lib: [3], parallel-btx: [2, 3]}}",
     "upcycle.parallel-btx: its seed 2 model is made from parallel-lib's seed 2 model, but parallel-lib is trained "
     "with seeds [1337, 3]"),
    ("{replicas_of: {parallel: [2], kd: [4], serial: [2, 3]}}",
     "distill.kd: its seed 4 model is made from serial's seed 4 model, but serial is trained with seeds [1337, 2, 3]: "
     "add 4 to serial's replicas, or set study.replicas_of.kd to seeds serial has"),
])
def test_replicate_seed_mistakes_are_named(tmp_path, study, expected):
    assert expected in problems(tmp_path, LINEAGE + f"study: {study}\n")


def test_a_replica_named_like_another_model_is_refused(tmp_path):
    msg = problems(tmp_path, LINEAGE.replace("kd:", "serial-s2:") + "study: {replicas: [2]}\n")
    assert "pretrain.serial: its seed 2 model would be named 'serial-s2', like another model of the study" in msg


def test_train_precision_and_compile_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text(MINIMAL)
    train = load_study(tmp_path / "params.yaml").train
    assert (train.precision, train.compile) == ("auto", False)


def test_bad_train_precision_and_compile_are_named_with_the_fix(tmp_path):
    msg = problems(tmp_path, MINIMAL + "train: {precision: bf16, compile: yes-please}\n")
    assert "2 problems" in msg
    assert "train.precision: input should be 'auto', '32-true', 'bf16-mixed'" in msg and "got 'bf16'" in msg
    assert "Use one of the values listed." in msg
    assert "train.compile" in msg and "Write true or false." in msg
