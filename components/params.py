"""The study schema: params.yaml, strictly validated, every problem reported at once.

Every stage calls `load_study()` first, and the `validate` stage runs it whenever params.yaml
changes at all, so a typo anywhere stops `dvc repro` before any compute.

    python -m tasks.validate            # prints every problem in params.yaml with its fix
"""
from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from components.config import PER_LAYER_BLOCKS, ModelConfig, merge_preset, preset_problems, run_problems
from components.errors import ParamsError

NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?$")   # also a valid DVC artifact name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)   # .inf/.nan: no field reads them


# Upper bounds of counts and sizes: generous (many times the largest published models' values) but
# finite, so an absurd value (n_embd: 1e9, a typo's extra zeros) is a message before any compute,
# not an out-of-memory or an int64 overflow deep in torch. MAX_SIZE_PARAMS bounds the whole model.
MAX_STEPS = 10**9                      # max_steps, warmup_steps, eval_every, ckpt_every
MAX_BATCH = 2**20                      # sequences (train.batch_size, evaluate.batch_size) or batches
MAX_LAYERS = 1024                      # n_layer, n_loop, and the layer indices of ffn_fusion runs
MAX_HEADS = 1024                       # n_head, n_kv_head
MAX_EXPERTS = 1024                     # n_expert, n_attn_expert
MAX_WIDTH = 2**16                      # n_embd (Llama 3 405B: 16384)
MAX_D_FF = 2**20                       # d_ff (Llama 3 405B: 53248)
MAX_BLOCK_SIZE = 2**20                 # context length: rope tables and learned positions are block_size x n_embd
MAX_D_STATE = 1024                     # hybrid SSM state per head (Mamba: 16, Mamba-2: 128)
MAX_SIZE_PARAMS = 10**11               # 400 GB of float32 weights, 1.6 TB with AdamW's state
MAX_THREADS = 1024                     # torch.set_num_threads: 10**6 threads crash the process
MAX_NODES = 2**16                      # train.num_nodes, train.devices (per node)
MAX_RUNS = 1000                        # evaluate.speed_warmup, speed_runs: the median of 1000 is plenty
MODEL_BOUNDS = {                       # ModelConfig's own checks (>= 1, divisibility, ...) do the rest
    "block_size": {"le": MAX_BLOCK_SIZE}, "n_layer": {"le": MAX_LAYERS}, "n_loop": {"le": MAX_LAYERS},
    "n_head": {"le": MAX_HEADS}, "n_kv_head": {"le": MAX_HEADS}, "n_embd": {"le": MAX_WIDTH},
    "d_ff": {"le": MAX_D_FF}, "n_expert": {"le": MAX_EXPERTS}, "n_attn_expert": {"le": MAX_EXPERTS},
    "top_k": {"le": MAX_EXPERTS}, "moe_every": {"le": MAX_LAYERS}, "d_state": {"le": MAX_D_STATE},
    "dwa_dilation": {"le": MAX_LAYERS**2}, "dwa_period": {"le": MAX_LAYERS**2},
    "rope_base": {"gt": 0}, "norm_eps": {"gt": 0},   # rope: base ** (-2i / hs); norms divide by sqrt(var + eps)
}
WIDTHS = list[Annotated[int, Field(le=MAX_D_FF)]]   # layer_n_head, layer_n_kv_head, layer_d_ff: per-layer widths


SEED = Annotated[int, Field(ge=0, le=2**32 - 1,   # lightning's seed_everything takes 0 to 2**32 - 1
                            description="the seed of lightning's seed_everything, which takes 0 to 2**32 - 1: "
                                        "pick one in that range, e.g. 1337")]


class StudyParams(Strict):
    name: str = "archflow"                 # names the MLflow experiment and the report
    seed: SEED = 1337                      # every model's own seed (models/<name>): its init and batch order
    # Replicate seeds: every model is also trained with each of these seeds, as models/<name>-s<seed>, one
    # DVC stage each (paired: arms with the same seed see the same batches), a later model from the
    # model of the same seed it is made from (one whose parent lacks that seed skips it).
    replicas: list[SEED] = []
    replicas_of: dict[str, list[SEED]] = {}   # per model: its own replicas instead, e.g. {par: [2], serial-kd: []}


# The default corpus: a pinned release of a pure-Python package (a dependency of torch, pinned in
# pyproject.toml) is the same bytes on every machine and Python version; the stdlib is not.
DEFAULT_CORPUS = "package:sympy==1.14.0"


class DataParams(Strict):
    # "package:<name>==<version>" (that installed release's files), "stdlib" (this interpreter's
    # standard library: differs between Python builds) or a directory (relative to the project root)
    source: str = DEFAULT_CORPUS
    include: list[str] = ["[a-i]*/*.py", "[a-i]*/tests/test_*.py"]   # globs relative to source, read in sorted order
    exclude: list[str] = []
    domains: dict[str, list[str]] = {}     # name -> globs (relative to source) for branch training
    tokenizer: Literal["bpe", "char", "byte", "hf"] = "bpe"
    vocab_size: int = Field(4096, ge=258, le=65536)   # bpe only: 256 byte tokens + merges + <|endoftext|>
    # hf only: a Hugging Face tokenizer.json, or a directory holding one (an imported model's): the study's
    # models then share that model's vocabulary
    hf_tokenizer: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # tail of each document held out for validation


# Every ModelConfig field but vocab_size (which the tokenizer decides), quant* and parallel_runs (compress@
# writes them: an int8 model is not trained; block-parallel runs are ffn_fusion's), each optional.
_MODEL_TYPES = get_type_hints(ModelConfig)
ModelOverrides = create_model(
    "ModelOverrides", __base__=Strict,
    **{f.name: (Optional[WIDTHS] if f.name.startswith("layer_") else Optional[_MODEL_TYPES[f.name]],
                Field(None, **MODEL_BOUNDS.get(f.name, {})))
       for f in fields(ModelConfig) if f.name not in ("vocab_size", "quant", "quant_embeddings", "parallel_runs")},
)
# A variant: optionally `preset` (a name of config.PRESETS), and overrides of any model field.
VariantParams = create_model("VariantParams", __base__=ModelOverrides, preset=(Optional[str], None))


# train.precision: auto, or one of Lightning's precision names
PRECISIONS = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                     "transformer-engine", "transformer-engine-float16"]


class TrainParams(Strict):
    max_steps: int = Field(1000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)   # sequences per optimizer step, summed over all devices
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)      # cosine decays to this
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)    # 0 disables clipping
    eval_every: int = Field(100, ge=1, le=MAX_STEPS)   # steps between validation-loss points of the training curve
    eval_batches: int = Field(4, ge=1, le=MAX_BATCH)
    ckpt_every: int = Field(100, ge=1, le=MAX_STEPS)   # steps between resumable checkpoints (outside DVC outs)
    accelerator: str = "auto"              # passed to lightning.pytorch.Trainer as is
    devices: int | str = "auto"            # a count per node (-1: all of them), or as Lightning reads a string
    num_nodes: int = Field(1, ge=1, le=MAX_NODES)
    strategy: str = "auto"
    # auto: bf16-mixed where the device has native bf16 matrix math and n_embd is wide enough to gain,
    # else 32-true (components/device.py resolve_precision); any other value goes to Lightning as it is
    precision: PRECISIONS = "auto"
    compile: bool = False                  # torch.compile the model for training (compile time: metrics' compile_s)
    deterministic: bool | Literal["warn"] = True   # "warn" on GPUs, where some kernels have no deterministic version


class PretrainParams(Strict):
    variants: dict[str, VariantParams] = Field(min_length=1)


class StageTrainParams(Strict):
    """Overrides of `train` for a stage that trains (branch, upcycle, distill, compress recovery)."""
    max_steps: Optional[int] = Field(None, ge=0, le=MAX_STEPS)   # default: train.max_steps; 0 = no training
    lr: Optional[float] = Field(None, gt=0)
    min_lr: Optional[float] = Field(None, ge=0)
    warmup_steps: Optional[int] = Field(None, ge=0, le=MAX_STEPS)


class BranchParams(StageTrainParams):
    """branch@<name>: a copy of `parent` continue-trained on one data domain (Branch-Train-MiX)."""
    parent: str                            # a pretrain variant
    domain: str                            # a key of data.domains


# upcycle@<name>: a dense parent (and its branches) turned into a model, then trained further. One
# class per method, told apart by `method`; each holds only the options its method reads, so
# `extra="forbid"` rejects the others (describe() says which method reads them).

# The MoE settings an upcycle writes into the model's config: ModelConfig's own fields, with its
# types and defaults; ModelConfig.problems() checks their values on the config the stage will build.
MOE_OPTIONS = ("top_k", "router", "moe_every", "shared_expert", "aux_loss_coef", "z_loss_coef")
MoEOptions = create_model(
    "MoEOptions", __base__=StageTrainParams,
    **{name: (_MODEL_TYPES[name], getattr(ModelConfig, name)) for name in MOE_OPTIONS},
    router_init=(Literal["random", "zero", "uniform"], "random"))   # new routers: N(0, 0.02) | 0 | U(+-1/sqrt(n_embd))


class Continue(StageTrainParams):
    """continue: the dense parent trained further on the mixed data (the control at equal tokens)."""
    method: Literal["continue"]
    parent: str                            # a pretrain variant

    def experts(self, branches: list[str]) -> list[str]:
        return []


class Sparse(MoEOptions):
    """sparse (Komatsuzaki et al.): every expert of an MoE FFN is a copy of the parent's FFN."""
    method: Literal["sparse"]
    parent: str
    n_expert: int = Field(4, ge=1, le=MAX_EXPERTS)   # copies of the FFN
    expert_noise: float = Field(0.0, ge=0)   # each copy's weights + noise * std(W) * N(0, 1)

    def experts(self, branches: list[str]) -> list[str]:
        return [self.parent] * self.n_expert

    def config_fields(self, n_expert: int) -> dict:
        """The ModelConfig fields this method writes over the parent's (components/upcycle.py builds the weights)."""
        return {"n_expert": n_expert, **{k: getattr(self, k) for k in MOE_OPTIONS}}


class Btx(MoEOptions):
    """btx (Branch-Train-MiX): expert e of an MoE FFN is branch e's FFN; every other weight is the branches' mean."""
    method: Literal["btx"]
    parent: str                            # its branches (the `branch` entries of this parent) are the experts
    keep_parent: bool = False              # the parent is one more expert besides its branches

    def experts(self, branches: list[str]) -> list[str]:
        return branches + [self.parent] * self.keep_parent

    def config_fields(self, n_expert: int) -> dict:
        return {"n_expert": n_expert, **{k: getattr(self, k) for k in MOE_OPTIONS}}


class Bam(MoEOptions):
    """bam (Branch-Attend-Mix): as btx, and each branch's attention is one expert of a soft mixture of attention."""
    method: Literal["bam"]
    parent: str
    keep_parent: bool = False
    moa: _MODEL_TYPES["moa"] = ModelConfig.moa   # ModelConfig's: kv-experts (own q, k, v, o) | kv-shared (shared k, v)

    def experts(self, branches: list[str]) -> list[str]:
        return branches + [self.parent] * self.keep_parent

    def config_fields(self, n_expert: int) -> dict:
        return {"n_expert": n_expert, "n_attn_expert": n_expert, "moa": self.moa,
                **{k: getattr(self, k) for k in MOE_OPTIONS}}


UpcycleEntry = Annotated[Union[Continue, Sparse, Btx, Bam], Field(discriminator="method")]


class DistillParams(StageTrainParams):
    """distill@<name>: a student trained on the teacher's outputs (Hinton KD)."""
    teacher: str                           # any model of the study
    student: VariantParams = VariantParams()   # init scratch: a preset and overrides of `model`, like a variant;
                                           # init teacher-every-other: only n_layer/dropout, over the teacher's config
    init: Literal["scratch", "teacher-every-other"] = "scratch"  # teacher-every-other: student block i = teacher's 2i
    alpha: float = 0.5                     # in [0, 1]: loss = (1 - alpha) * CE + alpha * T^2 * KL
    temperature: float = 2.0               # T > 0: softmax(logits / T) on both sides
    reverse: bool = False                  # KL(student || teacher) (mode-seeking) instead of KL(teacher || student)
    hidden_weight: float = Field(0.0, ge=0)  # + hidden_weight * (1 - cos) of the final normed hidden states


# compress@<name>: a smaller or cheaper copy of `source` (docs/methods.md: attention-drop, ffn-fusion, pruning,
# int8), or the same model (identity, the control), then recovery; one class per method as for upcycle.
# `verb` names what the method does to a model in messages; `needs_layers`: it works layer by layer, so the
# source must be a stack of attention + FFN layers.

class Int8(Strict):
    """int8: every Linear's weights (with `embeddings`, the embedding and LM head's too) rounded to int8."""
    verb: ClassVar[str] = "quantize"
    needs_layers: ClassVar[bool] = False
    max_steps: ClassVar[int] = 0           # int8 weights are not trainable: no recovery, no train options
    method: Literal["int8"]
    source: str                            # any model of the study
    embeddings: bool = False               # the embedding and LM head in int8 too (most of a small model's size)

    def source_problems(self, cfg: ModelConfig | None) -> list[str]:
        """Why this entry cannot transform a source of config `cfg` (None: not known until the source is built)."""
        return compress_shape_problems(cfg, self.method) if cfg is not None else []


class Recovery(StageTrainParams):
    """What every method but int8 shares: a float source, then max_steps steps of recovery (0: none, the
    transformed model as it is: the before-recovery number)."""
    source: str                            # any model of the study
    recover: Literal["train", "distill"] = "distill"   # continued training, or KD from the source
    alpha: float = Field(0.5, ge=0, le=1)  # recover distill: loss = (1 - alpha) * CE + alpha * T^2 * KL
    temperature: float = Field(2.0, gt=0)

    def source_problems(self, cfg: ModelConfig | None) -> list[str]:
        return compress_shape_problems(cfg, self.method) if cfg is not None else []


class Identity(Recovery):
    """identity: the source unchanged, then the recovery: the control for a method's recovery steps. Give it
    the recover, max_steps, lr, min_lr, warmup_steps (alpha, temperature) of the entry it controls for."""
    verb: ClassVar[str] = "train"
    needs_layers: ClassVar[bool] = False
    method: Literal["identity"]


class Calibrated(Recovery):
    """A method that scores the source on calibration batches (prune's importance, the searches)."""
    calib_batches: int = Field(4, ge=1, le=MAX_BATCH)   # training batches scored (prune: wanda, taylor; the searches)


class Prune(Calibrated):
    """prune: the least important KV groups and FFN channels of every layer removed."""
    verb: ClassVar[str] = "prune"
    needs_layers: ClassVar[bool] = True
    method: Literal["prune"]
    fraction: float = Field(ge=0, lt=1, description="the share of attention KV groups and FFN channels to remove, "
                                                    "e.g. fraction: 0.3")
    criterion: Literal["magnitude", "wanda", "taylor"] = "taylor"   # |W| | |W|*||X|| | |W*dL/dW|, summed per unit


class AttentionDrop(Calibrated):
    """attention_drop: the attention sublayer of each of `layers` removed; they become FFN-only layers, in order."""
    verb: ClassVar[str] = "drop the attention of"
    needs_layers: ClassVar[bool] = True
    method: Literal["attention_drop"]
    layers: list[Annotated[int, Field(ge=0, le=MAX_LAYERS)]] = []   # layers to make FFN-only; [] = search
    max_loss_increase: float = Field(0.1, ge=0)   # the search: calibration loss increase allowed (nats)

    def source_problems(self, cfg: ModelConfig | None) -> list[str]:
        return super().source_problems(cfg) or attention_layer_problems(cfg, self.layers)


class FfnFusion(Calibrated):
    """ffn_fusion: each run of consecutive FFN-only layers becomes one layer whose FFN is theirs side by side
    (mode ffn), or each run of whole layers reads one input, outputs summed (mode block-parallel)."""
    verb: ClassVar[str] = "fuse"
    needs_layers: ClassVar[bool] = True
    method: Literal["ffn_fusion"]
    mode: Literal["ffn", "block-parallel"] = "ffn"
    runs: list[list[Annotated[int, Field(ge=0, le=MAX_LAYERS)]]] = []   # [[first, last], ...] layers to fuse; [] = search
    max_loss_increase: float = Field(0.1, ge=0)   # the search: calibration loss increase allowed (nats)

    def source_problems(self, cfg: ModelConfig | None) -> list[str]:
        return super().source_problems(cfg) or fusion_run_problems(cfg, self.runs, self.mode)


CompressEntry = Annotated[Union[Int8, Prune, FfnFusion, AttentionDrop, Identity], Field(discriminator="method")]


class ImportParams(Strict):
    """A Hugging Face causal-LM checkpoint made an archflow model by the import stage (tasks/hf_import.py)."""
    path: str                              # a local HF model directory (config.json + *.safetensors), relative to
                                           # the project root: a DVC dependency, so changed files rerun the import
    hf: Optional[str] = None               # where it was downloaded from (e.g. EleutherAI/pythia-70m), for the lineage
    revision: Optional[str] = None         # and the revision downloaded (a commit hash pins it)

    def missing(self, name: str) -> str | None:
        """The problem when `path` holds no checkpoint yet, with how to get one (validate and import@ say it)."""
        if (Path(self.path) / "config.json").is_file():
            return None
        fetch = (f"download it with `huggingface-cli download {self.hf}" + (f" --revision {self.revision}" if
                 self.revision else "") + f" --local-dir {self.path}`" if self.hf else
                 "give a local Hugging Face model directory (config.json + *.safetensors)")
        return f"import.{name}.path: {self.path} has no config.json: {fetch}"


class EvaluateParams(Strict):
    # null: every validation window is scored. A number scores only the windows within the first max_tokens
    # tokens of each split (in file order, so some files weigh more than others): a quick look, not a score
    max_tokens: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    prompt_tokens: int = Field(64, ge=1)   # prefill length for the speed measurement (+ decode_tokens <= block_size)
    decode_tokens: int = Field(32, ge=1)
    # the batched decode measurement (decode_batch_tokens_per_s): decode_batch sequences, each with decode_context
    # tokens already in the cache (null: prompt_tokens), decode_tokens cached steps (context + decode_tokens <= block_size)
    decode_batch: int = Field(16, ge=1, le=MAX_BATCH)
    decode_context: Optional[int] = Field(None, ge=1)
    speed_warmup: int = Field(1, ge=0, le=MAX_RUNS)
    speed_runs: int = Field(5, ge=1, le=MAX_RUNS)   # the median is reported
    threads: int = Field(0, ge=0, le=MAX_THREADS)   # 0: torch's default
    # decode speeds by TransformerLM.compiled_step (torch.compile; on a GPU one CUDA graph a token): what the
    # architecture costs without Python's and the launches' share; its compilation (seconds) is not timed
    compile: bool = False
    # lm-evaluation-harness tasks scored with components/harness.py (pip install -e '.[eval]'): names as
    # `lm-eval ls tasks` lists them; checked at the evaluate stage's start (lm-eval is too slow to import here)
    tasks: list[Annotated[str, Field(min_length=1)]] = []
    task_paths: list[Annotated[str, Field(min_length=1)]] = []   # directories of local task YAMLs (include_path)
    limit: Optional[int] = Field(None, ge=1)       # examples per task (null: all); a quick look, not a score

    @property
    def batch_context(self) -> int:
        """Tokens in each sequence's cache before the batched decode steps: decode_context, else prompt_tokens."""
        return self.prompt_tokens if self.decode_context is None else self.decode_context

    def length_problems(self, block_size: int, whose: str) -> list[str]:
        """The speed measurements' lengths that exceed a model's block_size (whose: "of 'serial'", ...)."""
        p = []
        if self.prompt_tokens + self.decode_tokens > block_size:
            p.append(f"evaluate: prompt_tokens + decode_tokens = {self.prompt_tokens + self.decode_tokens} exceeds "
                     f"the block_size {block_size} {whose}: lower them")
        if self.decode_context is not None and self.decode_context + self.decode_tokens > block_size:
            p.append(f"evaluate: decode_context + decode_tokens = {self.decode_context + self.decode_tokens} exceeds "
                     f"the block_size {block_size} {whose}: lower decode_context (null: prompt_tokens) or decode_tokens")
        return p


class Claim(Strict):
    """A question the report answers with a verdict: Δ = model - baseline on `metric`, paired by seed,
    with a 95% interval (docs/verdicts.md)."""
    question: str = Field(min_length=1)    # shown in the verdict table, e.g. "Does the parallel block cost quality?"
    model: str                             # a model name of params.yaml (all its seeds)
    baseline: str
    metric: str = "val_loss"               # val_loss | val_bpb | domain.<d>.val_loss | domain.<d>.val_bpb |
                                           # lm_eval.<task>.<metric> (seed interval only: needs 2+ seeds)
    margin: float = Field(gt=0, description="the equivalence margin in the metric's units, stated before the "
                                            "results are seen, e.g. margin: 0.02 (nats)")
    higher_is_better: Optional[bool] = None   # lm_eval metrics only, and required there (acc: true);
                                              # losses and bits per byte are lower-is-better


class ReportParams(Strict):
    comparisons: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = []  # [model, baseline] pairs
    claims: list[Claim] = []


class Resources(Strict):
    """What one stage needs from the machine that runs it (python -m flows.pipeline): the flow asks
    the engine for it (Dask worker resources CPU/GPU/MEMORY, Ray num_cpus/num_gpus/memory) and tags
    the task run `gpu` when gpus > 0, for a Prefect tag concurrency limit. `dvc repro` ignores it."""
    cpus: Optional[int] = Field(None, ge=1, le=MAX_THREADS)   # CPU threads reserved; the stage gets OMP_NUM_THREADS
    gpus: Optional[int] = Field(None, ge=0, le=MAX_NODES)
    memory_gb: Optional[float] = Field(None, gt=0)


with warnings.catch_warnings():   # `register` shadows BaseModel.register (an ABC helper nobody calls here)
    warnings.filterwarnings("ignore", message='Field name "register"')

    class TrackingParams(Strict):
        experiment: Optional[str] = None       # default: study.name
        log_models: bool = False               # also log model weights as MLflow artifacts (DVC stores them anyway)
        register: bool = False                 # register each evaluated model: registered model <study.name>, alias <model>
        required: bool = True                  # false: if the backend is unreachable, warn once and run without MLflow


class Study(Strict):
    study: StudyParams = StudyParams()
    data: DataParams = DataParams()
    model: ModelOverrides = ModelOverrides()
    train: TrainParams = TrainParams()
    pretrain: PretrainParams
    imports: dict[str, ImportParams] = Field({}, alias="import")   # `import` is a Python keyword
    branch: dict[str, BranchParams] = {}
    upcycle: dict[str, UpcycleEntry] = {}
    distill: dict[str, DistillParams] = {}
    compress: dict[str, CompressEntry] = {}
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()
    # a stage's needs on a cluster, by stage (`pretrain@big`), foreach group (`pretrain`) or `default`
    resources: dict[str, Resources] = {}

    def resources_of(self, stage: str) -> Optional[Resources]:
        """The entry of `stage` (e.g. pretrain@big), else of its group (pretrain; pretrain-replica, else
        pretrain, for a replicate seed's), else `default`."""
        r, group = self.resources, stage.split("@")[0]
        return r.get(stage) or r.get(group) or r.get(group.removesuffix("-replica")) or r.get("default")

    def entries(self) -> dict[str, dict]:
        """Every model entry of params.yaml: name -> {stage, parents}, in stage then declaration order.
        An upcycle's parents are its parent, then the branches its experts come from."""
        out = {name: {"stage": "pretrain", "parents": []} for name in self.pretrain.variants}
        out |= {name: {"stage": "import", "parents": []} for name in self.imports}
        out |= {name: {"stage": "branch", "parents": [b.parent]} for name, b in self.branch.items()}
        out |= {name: {"stage": "upcycle", "parents": list(dict.fromkeys([u.parent, *u.experts(self.branches_of(u.parent))]))}
                for name, u in self.upcycle.items()}
        out |= {name: {"stage": "distill", "parents": [d.teacher]} for name, d in self.distill.items()}
        out |= {name: {"stage": "compress", "parents": [c.source]} for name, c in self.compress.items()}
        return out

    def seeds_of(self, entry: str, _seen: frozenset = frozenset()) -> list[int | None]:
        """The seeds entry `entry` is trained with, study.seed first, then its replicas: its own
        study.replicas_of, else study.replicas, less those the model it is made from lacks (a model of
        seed s is made from its parent's model of seed s); [None] for an import, one checkpoint."""
        if entry in self.imports:
            return [None]
        extra = self.study.replicas_of.get(entry)
        if extra is None:
            made_from = self.entries().get(entry, {"parents": []})["parents"][:1]
            if not made_from or made_from[0] in self.imports:
                extra = self.study.replicas
            elif made_from[0] in _seen:                      # a lineage loop: reference_problems reports it
                extra = []
            else:
                has = self.seeds_of(made_from[0], _seen | {entry})
                extra = [s for s in self.study.replicas if s in has]
        return [self.study.seed, *extra]

    def instance(self, entry: str, seed: int | None) -> str:
        """The model name of `entry` trained with `seed`: the entry's own name for study.seed (and an
        import), <entry>-s<seed> for a replicate seed."""
        return entry if seed is None or seed == self.study.seed else f"{entry}-s{seed}"

    def instances(self, entry: str) -> dict[int | None, str]:
        """seed -> model name, for each seed of `entry` (study.seed first)."""
        return {seed: self.instance(entry, seed) for seed in self.seeds_of(entry)}

    def parent_instance(self, parent: str, seed: int | None) -> str | None:
        """The model of entry `parent` that a model of seed `seed` is made from: the parent's model of the
        same seed, or its only model (an import, or a parent trained with one seed); None when it has
        several but not that seed (replica_problems reports it)."""
        seeds = self.seeds_of(parent)
        if seed in seeds or len(seeds) == 1:
            return self.instance(parent, seed if seed in seeds else seeds[0])
        return None

    def models(self) -> dict[str, dict]:
        """Every model of the study, one per entry and seed: name -> {stage, entry, seed, parents, dir,
        group}, in stage then declaration order. `group` is its dvc.yaml stage group: the stage's name
        (pretrain) for study.seed's models, <stage>-replica for a replicate seed's. Branches live under
        branches/<parent>/ (upcycle@ of that parent waits for all of them)."""
        entries, out = self.entries(), {}
        for entry, e in entries.items():
            for seed in self.seeds_of(entry):
                name = self.instance(entry, seed)
                parents = [self.parent_instance(p, seed) for p in e["parents"] if p in entries]
                parents = [p for p in parents if p is not None]
                replica = seed is not None and seed != self.study.seed
                out[name] = {"stage": e["stage"], "entry": entry, "seed": seed, "parents": parents,
                             "dir": f"branches/{parents[0]}/{name}" if e["stage"] == "branch" and parents
                             else f"models/{name}",
                             "group": e["stage"] + "-replica" * replica}
        return out

    def find_model(self, name: str, stage: str | None = None) -> dict:
        """models()[name], or one ParamsError naming the models the study (or `stage`) makes."""
        models = self.models()
        if name in models and stage in (None, models[name]["stage"]):
            return models[name]
        known = [n for n, m in models.items() if stage in (None, m["stage"])]
        stale = (" (if dvc repro ran this, models/replicas.yaml is older than params.yaml: run `python -m "
                 "tasks.validate`, then dvc repro)") if re.search(r"-s\d+$", name) else ""
        raise ParamsError(f"unknown {stage or ''} model '{name}'{stale}: the study's {stage or ''} models are ".replace("  ", " ")
                          + (", ".join(known) or "(none)"))

    def branch_models(self, parent: str, seed: int | None) -> list[str]:
        """The branch models of seed `seed` made from model `parent`, in declaration order (they live under
        branches/<parent>/, with those of other seeds when the parent is an import)."""
        return [n for n, m in self.models().items()
                if m["stage"] == "branch" and m["parents"][:1] == [parent] and m["seed"] == seed]

    def evaluated(self) -> list[str]:
        """The models with metrics/<name>.json: all but branches (intermediate steps of btx/bam)."""
        return [name for name, m in self.models().items() if m["stage"] != "branch"]

    def stage_of(self, name: str) -> str:
        """The DVC stage that makes model `name`, e.g. pretrain@serial or pretrain-replica@serial-s2."""
        return f"{self.models()[name]['group']}@{name}"

    def replica_plan(self) -> dict:
        """What dvc.yaml's *-replica stage groups iterate over (validate writes it to models/replicas.yaml):
        per stage, each replicate seed's model -> {entry, seed, and the model it is made from}, and the
        models evaluate-replica scores. dvc.yaml cannot cross params.yaml's entries with their seeds
        itself: a `matrix` gives no access to an entry's parent."""
        field = {"branch": "parent", "upcycle": "parent", "distill": "teacher", "compress": "source"}
        plan = {stage: {} for stage in ("pretrain", "branch", "upcycle", "distill", "compress", "evaluate")}
        for name, m in self.models().items():
            if m["group"].endswith("-replica"):
                made_from = {field[m["stage"]]: m["parents"][0]} if m["stage"] in field else {}
                plan[m["stage"]][name] = {"entry": m["entry"], "seed": m["seed"], **made_from}
                if m["stage"] != "branch":
                    plan["evaluate"][name] = {"entry": m["entry"], "seed": m["seed"]}
        return plan

    def model_dir(self, name: str) -> Path:
        return Path(self.models()[name]["dir"])

    def train_metrics(self, name: str) -> Path:
        """The training time of model `name` (branches too): wall-clock, so a DVC metric outside its
        model directory, whose bytes stay a function of the inputs."""
        return Path("metrics/train") / f"{name}.json"

    def roots(self) -> list[str]:
        """The models made from nothing else in the study: pretrain variants and imports (what branch@
        and upcycle@ start from)."""
        return [*self.pretrain.variants, *self.imports]

    def branches_of(self, parent: str) -> list[str]:
        return [name for name, b in self.branch.items() if b.parent == parent]

    def stage_train(self, entry: StageTrainParams | Int8) -> TrainParams:
        """The `train` section with a stage entry's own max_steps/lr/min_lr/warmup_steps over it (an int8
        entry has max_steps 0 only: it never trains)."""
        own = {k: getattr(entry, k, None) for k in StageTrainParams.model_fields}
        return self.train.model_copy(update={k: v for k, v in own.items() if v is not None})   # each was validated

    def variant_config(self, name: str, vocab_size: int) -> ModelConfig:
        """The resolved config of pretrain variant `name`: defaults <- model <- preset <- variant."""
        return ModelConfig(vocab_size=vocab_size, **self.variant_overrides(name))

    def variant_overrides(self, name: str) -> dict:
        """The ModelConfig fields variant `name` sets: model <- PRESETS[its preset] <- its own keys."""
        return self.with_preset(self.pretrain.variants[name])

    def student_overrides(self, name: str) -> dict:
        """The ModelConfig fields distill student `name` sets. init scratch: model <- PRESETS[its preset] <-
        its own keys, like a variant; teacher-every-other: its own keys only (they go over the teacher's)."""
        entry = self.distill[name]
        return self.with_preset(entry.student) if entry.init == "scratch" else _set(entry.student)

    def with_preset(self, variant: VariantParams) -> dict:
        """model <- PRESETS[variant.preset] <- the variant's own keys (an unknown preset is a validation problem)."""
        own = _set(variant)
        return merge_preset(_set(self.model), own.pop("preset", None), own)

    def student_config(self, name: str, teacher: ModelConfig) -> ModelConfig:
        """The resolved student of distill `name` (same vocabulary as its teacher). teacher-every-other:
        the teacher's config with n_layer halved, then the student's own keys; per-layer lists (a pruned
        teacher's widths) keep every other entry (check teacher_init_problems first)."""
        own = self.student_overrides(name)
        if self.distill[name].init == "scratch":
            return ModelConfig(vocab_size=teacher.vocab_size, **own)
        n = own.get("n_layer", teacher.n_layer // 2)
        base = {k: v[::2][:n] if isinstance(v, list) and len(v) == teacher.n_layer else v
                for k, v in teacher.to_dict().items()}
        return ModelConfig(**{**base, "n_layer": n, **own})

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.study.name


def _set(m: BaseModel) -> dict:
    return {k: v for k, v in m.model_dump().items() if v is not None}


def load_study(path: str | Path = "params.yaml") -> Study:
    """Parse and validate params.yaml; raise ParamsError listing every problem and its fix."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the project root, or copy tests/smoke/params.yaml there")
    raw = read_yaml(path)
    try:
        study = Study.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(format_problems(path, [describe(err) for err in e.errors()])) from None
    problems = semantic_problems(study)
    if problems:
        raise ParamsError(format_problems(path, problems))
    return study


def read_yaml(path: Path) -> dict:
    from ruamel.yaml import YAML, YAMLError  # YAML 1.2 like DVC: 1e-3 is a float

    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as e:
        where = str(e).split("To suppress this check")[0].strip()
        raise ParamsError(f"{path} is not valid YAML (duplicate key or syntax error):\n{where}\n"
                          f"Fix the line shown above.") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (study, data, model, train, pretrain, ...)")
    return raw


def describe(err: dict) -> str:
    """One pydantic error -> 'where: what is wrong. How to fix it.' `where` is the key as params.yaml
    writes it: pydantic's union tag (the `prune` of compress.x.prune.fraction) is left out."""
    path, node, field, methods = schema_at(err["loc"])
    loc, kind, value = ".".join(path), err["type"], err.get("input")
    about = field.description if field is not None else None
    if kind == "union_tag_not_found":                   # `method` picks the entry's class
        return f"{loc}.method: required but missing. Add it: one of {', '.join(method_classes(node))}."
    if kind == "union_tag_invalid":
        tag, names = err["ctx"]["tag"], list(method_classes(node))
        hint = difflib.get_close_matches(tag, names, n=1)
        return (f"{loc}.method: unknown method '{tag}'; " + (f"did you mean '{hint[0]}'? " if hint else "")
                + f"methods are {', '.join(names)}.")
    if kind == "extra_forbidden":
        return unknown_key(err["loc"], path, methods)
    if kind == "missing":
        return f"{loc}: required but missing. Add it" + (f": {about}" if about else ".")
    if kind in BOUNDS and field is not None:
        return f"{loc}: {value!r} {bounds(field)}" + (f"; {path[-1]} is {about}" if about else ".")
    fix = FIXES.get(kind.split("_")[0], "Fix the value.")
    return f"{loc}: {err['msg'][0].lower()}{err['msg'][1:]}, got {value!r} ({type(value).__name__}). {fix}"


def unknown_key(loc: tuple, path: list[str], methods: dict[str, type]) -> str:
    """'where: unknown key' and its likely fix: inside a method's entry, an option another method reads
    says which; else the closest known key."""
    where, key, entry = ".".join(path), path[-1], node_at(loc[:-1])
    if methods and isinstance(entry, type):
        method = method_of(entry)
        if key in StageTrainParams.model_fields and not issubclass(entry, StageTrainParams):
            return f"{where}: {method} does not train, so nothing reads {key}: remove it"
        if readers := [name for name, cls in methods.items() if key in cls.model_fields]:
            return f"{where}: only read by method {' or '.join(readers)}, not {method}: remove it"
    keys = known_keys(loc[:-1])
    hint = difflib.get_close_matches(key, keys, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else f"known keys here: {', '.join(keys)}."
    return f"{where}: unknown key; {fix} Remove it or fix the spelling."


FIXES = {"int": "Write a whole number without quotes, e.g. 4.",
         "float": "Write a number without quotes, e.g. 0.001 or 1.0e-3.",
         "bool": "Write true or false.",
         "string": "Write a string (quote it if YAML reads it as something else).",
         "literal": "Use one of the values listed.",
         "finite": "Write a finite number, e.g. 0.001 (no field reads .inf or .nan)."}
BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def bounds(field) -> str:
    """'is outside [0, 1)' or 'must be >= 1': a field's range, from its ge/gt/le/lt."""
    b = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    low = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else None
    high = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else None
    if low and high:
        return f"is outside {low}, {high}"
    op, bound = next((op, b[k]) for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in b)
    return f"must be {op} {bound}"


def schema_at(loc: tuple) -> tuple[list[str], object, object, dict]:
    """Follow an error location through the schema: (the keys as params.yaml writes them, the type
    reached, the FieldInfo of the last key if it is a field, the method classes of the last
    discriminated union passed, by name). Pydantic's union tags are steps into a class, not keys."""
    node, path, field, methods = Study, [], None, {}
    for part in loc:
        if method_classes(node):
            methods = method_classes(node)
            node = methods.get(part)
            continue
        path.append(str(part))
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = next((f for name, f in node.model_fields.items() if (f.alias or name) == str(part)), None)
            node = field.annotation if field else None
        else:  # inside dict[str, X] or list[X]: the key is a name or an index, step into X
            args, field = get_args(node), None
            node = args[-1] if args else None
    return path, node, field, methods


def node_at(loc: tuple):
    return schema_at(loc)[1]


def known_keys(loc: tuple) -> list[str]:
    """Keys allowed at a location, for 'did you mean' hints."""
    node = node_at(loc)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return []
    return sorted(f.alias or name for name, f in node.model_fields.items())


def method_classes(node) -> dict[str, type]:
    """method name -> class, when `node` is a union discriminated by `method` (UpcycleEntry,
    CompressEntry); else {}."""
    if get_origin(node) is not Annotated or getattr(get_args(node)[1], "discriminator", None) != "method":
        return {}
    return {method_of(cls): cls for cls in get_args(get_args(node)[0])}


def method_of(cls: type) -> str:
    return get_args(cls.model_fields["method"].annotation)[0]


def semantic_problems(study: Study) -> list[str]:
    """Problems pydantic cannot see: names, references, impossible shapes."""
    p = []
    sections = {"pretrain.variants": study.pretrain.variants, "import": study.imports, "branch": study.branch,
                "upcycle": study.upcycle, "distill": study.distill, "compress": study.compress}
    names = list(study.models())
    seen = {}
    for section, keys in sections.items():
        for name in keys:
            if name in seen:
                p.append(f"{section}.{name}: the name is already used in {seen[name]}; model names are unique "
                         f"across the study (they name models/<name> and metrics/<name>.json): rename one")
            seen.setdefault(name, section)
    for section, keys in (*sections.items(), ("data.domains", study.data.domains)):
        for name in keys:
            if not NAME_RE.match(name):
                p.append(f"{section}.{name}: the name is unsafe as a path, stage or DVC artifact name; "
                         f"use letters, digits, '-' and '_' (at most 64, starting and ending with a letter or digit)")
    base_cfg = _unchecked_config(_set(study.model))
    base = base_cfg.problems() + size_problems(base_cfg, study.data.vocab_size)
    p += [f"model: {problem}" for problem in base]
    for name, variant in study.pretrain.variants.items():
        if variant.preset is not None:
            p += [f"pretrain.variants.{name}: {problem}" for problem in preset_problems(variant.preset)]
        cfg = _unchecked_config(study.variant_overrides(name))
        for problem in cfg.problems() + size_problems(cfg, study.data.vocab_size):
            if problem not in base:
                p.append(f"pretrain.variants.{name}: {problem}")
    p += reference_problems(study) + replica_problems(study) + tokenizer_problems(study)
    p += branch_problems(study) + upcycle_problems(study) + distill_problems(study) + compress_problems(study)
    p += claim_problems(study)
    for i, pair in enumerate(study.report.comparisons):
        for name in pair:
            if name not in names:
                hint = difflib.get_close_matches(name, names, n=1)
                p.append(f"report.comparisons.{i}: unknown model '{name}'"
                         + (f"; did you mean '{hint[0]}'?" if hint else f"; models are {', '.join(names)}"))
    ev = study.evaluate
    for name in study.pretrain.variants:   # later stages keep their parent's block_size (distill_problems checks students)
        p += ev.length_problems(_unchecked_config(study.variant_overrides(name)).block_size, f"of '{name}'")
    if study.tracking.register:
        for name in study.evaluated():
            if name.lower() == "latest" or re.fullmatch(r"[vV]\d+", name):
                p.append(f"tracking.register: the model name '{name}' cannot be an MLflow alias ('latest' and "
                         f"v<number> are reserved): rename the model or set register: false")
    devices = study.train.devices
    if isinstance(devices, int) and not (devices == -1 or 1 <= devices <= MAX_NODES):
        p.append(f"train.devices: {devices} is not a device count: use a count in [1, {MAX_NODES}], -1 (all of them) "
                 f"or auto")
    if study.train.min_lr > study.train.lr:
        p.append(f"train.min_lr={study.train.min_lr} exceeds train.lr={study.train.lr}: lower min_lr")
    return p + stage_lr_problems(study)


def stage_lr_problems(study: Study) -> list[str]:
    """min_lr <= lr after each stage entry's own lr/min_lr go over `train` (the cosine decays from lr to min_lr)."""
    p = []
    for section in ("branch", "upcycle", "distill", "compress"):
        for name, entry in getattr(study, section).items():
            if not isinstance(entry, StageTrainParams):                # int8: no lr
                continue
            t, where = study.stage_train(entry), f"{section}.{name}"
            if t.min_lr <= t.lr or (entry.lr is None and entry.min_lr is None):   # train's own: reported above
                continue
            if entry.min_lr is None:
                p.append(f"{where}.lr: {t.lr} is below train.min_lr={t.min_lr}, where the cosine would end: "
                         f"also set {where}.min_lr <= {t.lr}, or raise lr")
            else:
                p.append(f"{where}.min_lr: {t.min_lr} exceeds {'train.' * (entry.lr is None)}lr={t.lr}: "
                         f"lower min_lr" + (f", or set {where}.lr" if entry.lr is None else ""))
    return p


def _unknown(kind: str, name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1)
    return (f"unknown {kind} '{name}'; " + (f"did you mean '{hint[0]}'?" if hint else
            f"{kind}s are {', '.join(known) or '(none)'}"))


def reference_problems(study: Study) -> list[str]:
    """Every parent/teacher/source names a model that exists and comes earlier in the DAG."""
    p, variants, models = [], study.roots(), study.entries()
    for section, entries, field, allowed in (
            ("branch", study.branch, "parent", variants), ("upcycle", study.upcycle, "parent", variants),
            ("distill", study.distill, "teacher", None), ("compress", study.compress, "source", None)):
        for name, entry in entries.items():
            ref = getattr(entry, field)
            known = allowed if allowed is not None else [m for m, e in models.items() if e["stage"] != "branch" and m != name]
            if ref not in known:
                what = "pretrain variant or import" if allowed is not None else "model"
                p.append(f"{section}.{name}.{field}: {_unknown(what, ref, known)}")
    for name in models:                    # distill/compress may chain: A teaches B, B's copy teaches A
        path, todo = [name], list(models[name]["parents"])
        while todo:
            ref = todo.pop()
            if ref == name:
                p.append(f"{models[name]['stage']}.{name}: its lineage loops back to itself "
                         f"({' <- '.join(path + [name])}): pick a parent made earlier")
                break
            if ref in models and ref not in path:
                path.append(ref)
                todo += models[ref]["parents"]
    for name, b in study.branch.items():
        if b.domain not in study.data.domains:
            p.append(f"branch.{name}.domain: {_unknown('domain', b.domain, list(study.data.domains))}")
    for name, u in study.upcycle.items():
        if u.parent in study.roots() and not study.branches_of(u.parent):
            p.append(f"upcycle.{name}: its parent '{u.parent}' has no branches; dvc.yaml makes every upcycle of a "
                     f"parent wait for branches/{u.parent}/: declare at least one `branch` entry with "
                     f"parent: {u.parent} (btx and bam make one expert of each)")
    return p


def replica_problems(study: Study) -> list[str]:
    """Replicate seeds: distinct and other than study.seed, given to models that train, and every model of
    a seed finds the models it is made from (its parent's model of that seed, or the parent's only one)."""
    p, entries, seed = [], study.entries(), study.study.seed
    for where, seeds in (("study.replicas", study.study.replicas),
                         *((f"study.replicas_of.{name}", s) for name, s in study.study.replicas_of.items())):
        if len(set(seeds)) != len(seeds):
            p.append(f"{where}: {seeds} repeats a seed; each replica is one more seed: list each once")
        if seed in seeds:
            p.append(f"{where}: {seed} is study.seed, whose models every model has already; list other seeds")
    for name in study.study.replicas_of:
        if name in study.imports:
            p.append(f"study.replicas_of.{name}: an imported checkpoint is one model, trained by someone else; "
                     f"replicate the models made from it instead")
        elif name not in entries:
            p.append(f"study.replicas_of.{name}: {_unknown('model', name, [e for e in entries if e not in study.imports])}")
    for entry, e in entries.items():
        for s in study.seeds_of(entry):
            name = study.instance(entry, s)
            if name != entry and name in entries:
                p.append(f"{e['stage']}.{entry}: its seed {s} model would be named '{name}', like another model of the "
                         f"study: rename that one")
            elif not NAME_RE.match(name):
                p.append(f"{e['stage']}.{entry}: its seed {s} model's name '{name}' is too long for a path or "
                         f"stage name (64 characters): shorten the name or pick a smaller seed")
            for parent in e["parents"]:
                if parent in entries and study.parent_instance(parent, s) is None:
                    p.append(f"{e['stage']}.{entry}: its seed {s} model is made from {parent}'s seed {s} model, but "
                             f"{parent} is trained with seeds {study.seeds_of(parent)}: add {s} to {parent}'s "
                             f"replicas, or set study.replicas_of.{entry} to seeds {parent} has")
    models = study.models()
    for name, m in models.items():            # an upcycle's experts: branches of its own parent's model
        if m["stage"] == "upcycle":
            branched = [b for b, mb in models.items() if mb["stage"] == "branch" and mb["parents"][:1] == m["parents"][:1]]
            if m["parents"] and m["seed"] != seed and not branched:   # study.seed's: reference_problems says it
                p.append(f"upcycle.{m['entry']}: its seed {m['seed']} model's parent {m['parents'][0]} has no branches; "
                         f"dvc.yaml makes it wait for branches/{m['parents'][0]}/: give a branch of "
                         f"{models[m['parents'][0]]['entry']} seed {m['seed']}")
            for branch in m["parents"][1:]:
                if models[branch]["parents"][:1] != m["parents"][:1] or models[branch]["seed"] != m["seed"]:
                    p.append(f"upcycle.{m['entry']}: its seed {m['seed']} model takes its experts from the branches "
                             f"of {m['parents'][0]}, but branch {models[branch]['entry']} has no seed {m['seed']} "
                             f"model: give {models[branch]['entry']} the seeds of {m['entry']}")
    return p


def tokenizer_problems(study: Study) -> list[str]:
    """data.hf_tokenizer goes with data.tokenizer hf, and imported models need it: their token ids mean
    their own tokenizer's text (the import stage checks it is theirs)."""
    data, p = study.data, []
    if data.tokenizer == "hf" and not data.hf_tokenizer:
        p.append("data.hf_tokenizer: data.tokenizer is hf, so name the tokenizer: a tokenizer.json or a Hugging Face "
                 "model directory holding one, e.g. the path of an import entry")
    if data.tokenizer != "hf" and data.hf_tokenizer:
        p.append(f"data.hf_tokenizer: it is read only with data.tokenizer hf (this study trains a {data.tokenizer} "
                 f"tokenizer): set tokenizer: hf, or remove hf_tokenizer")
    if study.imports and data.tokenizer != "hf":
        name, entry = next(iter(study.imports.items()))
        p.append(f"import.{name}: an imported model reads its own tokenizer's token ids, but data.tokenizer is "
                 f"{data.tokenizer}: set data.tokenizer: hf and data.hf_tokenizer: {entry.path}")
    return p


# Checks of each stage's own settings (shapes, ranges, method options); empty lists when all is well.

def branch_problems(study: Study) -> list[str]:
    """A branch's parent and domain are checked in reference_problems; its train overrides by the schema."""
    return []


def upcycle_problems(study: Study) -> list[str]:
    """What can be said before the parent exists: its config (a pretrain variant) and the MoE the method
    would make of it, checked by ModelConfig like any config (an imported parent: at stage start)."""
    p = []
    for name, u in study.upcycle.items():
        if not isinstance(u, MoEOptions) or u.parent not in study.pretrain.variants:   # unknown parent: reported
            continue
        parent = _unchecked_config(study.variant_overrides(u.parent))
        if parent.problems() or size_problems(parent, study.data.vocab_size):   # reported under pretrain.variants
            continue
        parent.vocab_size = study.data.vocab_size                # its size as prepare will make it (bpe: at most)
        p += upcycle_parent_problems(study, name, parent)
    return p


def upcycle_parent_problems(study: Study, name: str, parent: ModelConfig) -> list[str]:
    """Why upcycle `name` cannot make its MoE of a parent of config `parent`."""
    u, where, p = study.upcycle[name], f"upcycle.{name}", []
    if not isinstance(u, MoEOptions):                        # continue: any parent
        return []
    if parent.n_expert or parent.n_attn_expert:
        p.append(f"{where}.parent: '{u.parent}' is already an MoE model: upcycle a dense variant")
    elif isinstance(u, Bam) and parent.block not in ("parallel", "parallel-unfused"):
        p.append(f"{where}.parent: bam needs a parallel-block parent (block parallel or parallel-unfused: "
                 f"attention and FFN experts read one normalised input), '{u.parent}' has block {parent.block}: "
                 f"pick a parallel variant")
    elif parent.block not in ("serial", "parallel", "parallel-unfused") or parent.n_loop != 1:
        p.append(f"{where}.parent: '{u.parent}' has block {parent.block} (n_loop {parent.n_loop}); "
                 f"upcycling takes block serial, parallel or parallel-unfused with n_loop 1")
    else:
        n = len(u.experts(study.branches_of(u.parent)))
        too_many = n and u.top_k > n
        if too_many:
            fix = "raise n_expert" if isinstance(u, Sparse) else f"add branches of {u.parent} or set keep_parent"
            p.append(f"{where}.top_k: {u.top_k} exceeds the {n} experts: lower top_k or {fix}")
        moe = _unchecked_config({**parent.to_dict(), **u.config_fields(n)})
        p += [f"{where}: {problem}" for problem in moe.moe_problems()      # less its wording of too_many
              if not (too_many and problem.startswith(f"top_k={u.top_k} must be"))]
        p += [f"{where}: {problem}" for problem in size_problems(moe, parent.vocab_size)]
    return p


def distill_problems(study: Study) -> list[str]:
    p = []
    for name, d in study.distill.items():
        if not 0.0 <= d.alpha <= 1.0:
            p.append(f"distill.{name}.alpha: {d.alpha} is outside [0, 1]; the loss is (1 - alpha) * CE + "
                     f"alpha * KD: pick e.g. 0.5")
        if d.temperature <= 0:
            p.append(f"distill.{name}.temperature: {d.temperature} must be > 0 (softmax(logits / T)): pick e.g. 2.0")
        p += [f"distill.{name}.{problem}" for problem in student_problems(study, name)]
    return p


def student_problems(study: Study, name: str) -> list[str]:
    """A scratch student is checked like a variant; a teacher-initialised one against its teacher's shape
    when the teacher is a pretrain variant (other teachers: at stage start, from their config.json)."""
    d = study.distill[name]
    if d.init != "scratch":
        teacher = _unchecked_config(study.variant_overrides(d.teacher)) if d.teacher in study.pretrain.variants \
            else None
        return teacher_init_problems(teacher if teacher is None or not teacher.problems() else None, _set(d.student))
    p = preset_problems(d.student.preset) if d.student.preset is not None else []
    cfg, base = _unchecked_config(study.student_overrides(name)), _unchecked_config(_set(study.model)).problems()
    p += [problem for problem in cfg.problems() if problem not in base] + size_problems(cfg, study.data.vocab_size)
    ev = study.evaluate
    p += ev.length_problems(cfg.block_size, "of the student")
    return [f"student: {problem}" for problem in p]


TEACHER_INIT_KEYS = ("n_layer", "dropout")     # all a student initialised from its teacher's layers may change


def teacher_init_problems(teacher: ModelConfig | None, own: dict) -> list[str]:
    """Why a student cannot start as every other layer of `teacher` (None: check the student's keys only).
    Allowed: teachers that are a stack of identical layers (serial, parallel*, hybrid, one-wide-ffn, looped,
    MoE); not par (sublayers, not layers) nor dwa (depth weights sized by the depth)."""
    p = [f"student.{k}: a student initialised from its teacher keeps the teacher's {k}; only "
         f"{' and '.join(TEACHER_INIT_KEYS)} may change (or use init: scratch)" for k in own if k not in TEACHER_INIT_KEYS]
    if teacher is None:
        return p
    if teacher.block == "par":
        p.append("init: the teacher is a par model (a layout of attention and FFN sublayers, not layers): it has no "
                 "every other layer to take; use init: scratch")
    if teacher.dwa:
        p.append("init: the teacher's DenseFormer depth weights are sized by its depth and cannot be halved; "
                 "use init: scratch")
    if getattr(teacher, "parallel_runs", []):
        p.append("init: the teacher's block-parallel runs (parallel_runs) name its layers, which every other layer "
                 "would not keep; use init: scratch, or distill from the model it was made from")
    if getattr(teacher, "quant", ""):
        p.append(f"init: the teacher's weights are {teacher.quant}: a student copied from them could not train; "
                 f"use init: scratch, or distill from the float model it was made from")
    n = own.get("n_layer", teacher.n_layer // 2)
    if n < 1:
        p.append(f"student.n_layer={n}: a student needs at least one layer" if "n_layer" in own else
                 "init: the teacher has 1 layer, so half of it is nothing; use init: scratch")
    elif 2 * (n - 1) >= teacher.n_layer:
        p.append(f"student.n_layer={n} needs teacher layers 0, 2, ..., {2 * n - 2} but the teacher has "
                 f"{teacher.n_layer}: use n_layer <= {math.ceil(teacher.n_layer / 2)}")
    return p


def compress_problems(study: Study) -> list[str]:
    """What can be said of the source before it exists: its config when it is a pretrain variant, its
    method when it is another compress entry (the stage checks the rest)."""
    p = []
    for name, c in study.compress.items():
        where = f"compress.{name}"
        if isinstance(c, Recovery) and {"alpha", "temperature"} & c.model_fields_set and c.recover != "distill":
            p.append(f"{where}: alpha and temperature are only read with recover: distill")
        if isinstance(c, Identity) and c.max_steps == 0:
            p.append(f"{where}.max_steps: identity with max_steps 0 is a copy of its source '{c.source}': give it the "
                     f"max_steps (and recover, lr, ...) of the entry whose recovery it controls for")
        source = study.compress.get(c.source)
        if isinstance(source, Int8):
            p.append(f"{where}.source: '{c.source}' is an int8 model: {c.verb} its float source "
                     f"'{source.source}' instead (int8 last)")
        cfg = _unchecked_config(study.variant_overrides(c.source)) if c.source in study.pretrain.variants else None
        if cfg is None or not cfg.problems():                     # a variant's problems: reported under it
            p += [f"{where}: {problem}" for problem in c.source_problems(cfg)]
    return p


def compress_shape_problems(cfg: ModelConfig, method: str) -> list[str]:
    """Why compress `method` cannot transform a model of config `cfg` (empty if it can)."""
    verb = method_classes(CompressEntry)[method].verb
    if cfg.quant:
        return [f"cannot {verb} an int8 model: its weights are already rounded to int8; {verb} its float source "
                f"instead (int8 last)"]
    if not method_classes(CompressEntry)[method].needs_layers:
        return []
    if method == "ffn_fusion" and cfg.norm_bias:
        return ["cannot fuse the FFNs of a norm_bias model (a Falcon import) exactly: each layernorm's shift "
                "would become an FFN bias, which bias: false leaves out; prune it or quantise it instead"]
    if method == "ffn_fusion" and cfg.parallel_runs:
        return [f"cannot fuse a model whose layers already run in block-parallel runs {cfg.parallel_runs}: its layer "
                f"numbers would shift; fuse every run in one ffn_fusion entry of its source"]
    why = ("its layers are not a stack of attention + FFN layers" if cfg.block not in PER_LAYER_BLOCKS else
           "its blocks run more than once (n_loop)" if cfg.n_loop != 1 else
           "its depth-weighted averages (dwa) are sized by the layers" if cfg.dwa else
           "its FFNs are experts or its attention a mixture" if cfg.n_expert or cfg.n_attn_expert else "")
    kind = ("looped" if cfg.n_loop != 1 else "denseformer" if cfg.dwa else
            "MoE" if cfg.n_expert or cfg.n_attn_expert else cfg.block)
    return [f"cannot {verb} a {kind} model: {why}; {method} handles {', '.join(PER_LAYER_BLOCKS)} models "
            f"without n_loop, dwa or experts"] if why else []


def attention_layer_problems(cfg: ModelConfig | None, layers: list[int]) -> list[str]:
    """attention_drop's `layers`: distinct layers of the source that have attention (cfg None: not known yet)."""
    p = []
    if len(set(layers)) < len(layers):
        p.append(f"layers: {layers} names a layer twice: name each once")
    if cfg is None:
        return p
    if missing := [i for i in layers if i >= cfg.n_layer]:
        p.append(f"layers: {missing} are not layers of the source (n_layer={cfg.n_layer}): use 0 .. {cfg.n_layer - 1}")
    elif none := [i for i in layers if not cfg.layer_widths(i)[0]]:
        p.append(f"layers: {none} have no attention already: name layers that still have it")
    if not layers and not any(cfg.layer_widths(i)[0] for i in range(cfg.n_layer)):
        p.append("layers: [] searches for attention to drop, but the source has none left: use another source")
    return p


def fusion_run_problems(cfg: ModelConfig | None, runs: list[list[int]], mode: str) -> list[str]:
    """Each run [first, last] names two or more consecutive existing layers; runs are disjoint; mode ffn
    fuses FFN-only layers only (cfg None: the source is not known yet)."""
    p = run_problems(cfg.n_layer if cfg is not None else None, runs, "runs")
    if p or cfg is None or mode != "ffn":
        return p
    ffn_only = [not cfg.layer_widths(i)[0] for i in range(cfg.n_layer)]
    if attention := [j for a, b in runs for j in range(a, b + 1) if not ffn_only[j]]:
        p.append(f"runs: layers {attention} still have attention; mode ffn fuses FFN-only layers: make them FFN-only "
                 f"first (source: an attention_drop entry of these layers), or set mode: block-parallel to run whole "
                 f"layers side by side")
    elif not runs and not any(ffn_only[i] and ffn_only[i + 1] for i in range(cfg.n_layer - 1)):
        p.append("runs: [] searches runs of FFN-only layers, but the source has no two consecutive ones: fuse an "
                 "attention_drop entry's model (source: it), or set mode: block-parallel")
    return p


LOSS_METRICS = ("val_loss", "val_bpb")     # per token and per byte; each also per domain: domain.<d>.val_loss


def claim_problems(study: Study) -> list[str]:
    """Each report claim compares two evaluated models whose seeds pair, on a metric the evaluate stage writes."""
    p, entries = [], list(dict.fromkeys(study.models()[name]["entry"] for name in study.evaluated()))
    for i, c in enumerate(study.report.claims):
        where = f"report.claims.{i}"
        unknown = [f"{where}.{side}: {_unknown('model', name, entries)}"
                   for side, name in (("model", c.model), ("baseline", c.baseline)) if name not in entries]
        if c.model == c.baseline:
            unknown.append(f"{where}: model and baseline are both '{c.model}': name the baseline it is compared with")
        p += unknown + [f"{where}.{problem}" for problem in metric_problems(study, c)]
        pairs = claim_pairs(study, c.model, c.baseline) if not unknown else []
        if pairs is None:
            seeds = {side: list(study.instances(name)) for side, name in (("model", c.model), ("baseline", c.baseline))}
            p.append(f"{where}: model '{c.model}' has seeds {seeds['model']} and baseline '{c.baseline}' has "
                     f"{seeds['baseline']}: a paired comparison needs the same seeds on both sides; give both "
                     f"entries the same replicas")
        elif c.metric.startswith("lm_eval.") and len(pairs) == 1:
            p.append(f"{where}.metric: {c.metric} has no per-window scores, so its interval is over seeds only and "
                     f"'{c.model}' vs '{c.baseline}' has one seed: add replicas to both, or claim a loss metric")
    return p


def metric_problems(study: Study, claim: Claim) -> list[str]:
    """Whether the evaluate stage writes `claim.metric` and which direction is better is known."""
    metric, per_domain = claim.metric, re.fullmatch(r"domain\.([^.]+)\.(val_loss|val_bpb)", claim.metric)
    if metric.startswith("lm_eval."):
        if not study.evaluate.tasks:
            return [f"metric: {metric} is an lm-eval score, but evaluate.tasks is empty: add its task there"]
        if claim.higher_is_better is None:
            return [f"higher_is_better: required for an lm-eval metric: true for acc, acc_norm or exact_match, "
                    f"false for perplexities"]
        return []
    losses = [*LOSS_METRICS, *(f"domain.{d}.{m}" for d in study.data.domains for m in LOSS_METRICS)]
    if metric == "val_ppl":
        return ["metric: val_ppl is exp(val_loss), so it has the same verdict: claim val_loss, with the margin "
                "in nats"]
    if per_domain and per_domain[1] not in study.data.domains:
        return [f"metric: {metric}: {_unknown('domain', per_domain[1], list(study.data.domains))}"]
    if metric not in losses:
        hint = difflib.get_close_matches(metric, losses, n=1)
        return [f"metric: unknown metric '{metric}'; " + (f"did you mean '{hint[0]}'? " if hint else "")
                + f"claims compare {', '.join(losses)} or lm_eval.<task>.<metric> (with evaluate.tasks)"]
    if claim.higher_is_better:
        return [f"higher_is_better: {metric} is a loss, lower is better: remove higher_is_better"]
    return []


def claim_pairs(study: Study, model: str, baseline: str) -> list[tuple[str, str]] | None:
    """The (model, baseline) instances a claim compares, one pair per seed, primary seed first; an import
    (seed None) pairs with every seed of the other side. None: their seeds differ and cannot pair."""
    m, b = study.instances(model), study.instances(baseline)
    if None in b:
        return [(name, b[None]) for name in m.values()]
    if None in m:
        return [(m[None], name) for name in b.values()]
    return [(m[seed], b[seed]) for seed in m] if set(m) == set(b) else None


def size_problems(cfg: ModelConfig, vocab_size: int) -> list[str]:
    """The model's size, roughly (the embedding and each layer's attention and FFN matmuls), against
    MAX_SIZE_PARAMS: each field within its bound can still multiply up to an absurd model."""
    n, d_ff = cfg.n_embd, cfg.d_ff or 4 * cfg.n_embd      # d_ff 0: 4 n_embd (gelu; swiglu and one-wide-ffn alike)
    size = vocab_size * n + cfg.n_layer * (4 * n * n * max(1, cfg.n_attn_expert) + 2 * n * d_ff * max(1, cfg.n_expert))
    if size <= MAX_SIZE_PARAMS:
        return []
    return [f"about {size:.1e} parameters (n_layer={cfg.n_layer}, n_embd={n}, d_ff={d_ff}, n_expert={cfg.n_expert}), "
            f"over the {MAX_SIZE_PARAMS:.0e} allowed (400 GB of float32 weights): shrink the model"]


def _unchecked_config(overrides: dict) -> ModelConfig:
    """The config these overrides would build, without __post_init__'s checks (to collect problems)."""
    cfg = ModelConfig.__new__(ModelConfig)
    for f in fields(ModelConfig):
        setattr(cfg, f.name, overrides.get(f.name, f.default if f.default is not MISSING else f.default_factory()))
    return cfg


def format_problems(path: Path, problems: list[str]) -> str:
    n = len(problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{path} is invalid ({n} problem{'s' * (n != 1)}); nothing was run:\n{lines}"
