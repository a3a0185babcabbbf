"""The thin Lightning layer: LM loss, AdamW with warmup + cosine, the training-curve callback,
the data module, and `fit`, the resumable training every training stage runs.

The model itself (components/model.py) knows nothing of Lightning.

    curve.start(curve.val_loss(model))     # stages that start from trained weights: the step-0 row
    if not fit(lit, data, curve, train, Path("checkpoints") / name, params_hash, logger):
        return                             # a DDP rank other than 0: rank 0 writes the outputs
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from components.lean_torchmetrics import import_torchmetrics

import_torchmetrics()   # before Lightning does: without the backends of metrics archflow never computes

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch import seed_everything  # noqa: F401  (the training stages seed through here)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from components.config import ModelConfig
from components.curve import Curve
from components.data import StepBatches, StepsFrom, load_tokens
from components.device import device_name, global_rank0, resolve_precision
from components.errors import ParamsError
from components.model import TransformerLM, lm_loss, moe_layers, moe_losses

# Lightning 2.6's own code calls a torch API that torch 2.13 deprecates, once a stage: nothing for a user to act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

if TYPE_CHECKING:                     # only the type: the schema is not needed to train
    from components.params import TrainParams


FUSED_ADAMW = ("cpu", "cuda")     # devices whose fused AdamW kernel torch has (CPU: torch 2.4+)


def lr_factor(step: int, warmup: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of lr at `step`: linear warmup, then cosine from lr down to min_lr at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


class LitLM(L.LightningModule):
    """Next-token training of `model` (a new TransformerLM(cfg) unless given, e.g. a parent's copy)."""

    def __init__(self, cfg: ModelConfig, train: TrainParams, params_hash: str = "",
                 model: TransformerLM | None = None):
        super().__init__()
        self.cfg, self.train_params, self.params_hash = cfg, train, params_hash
        self.model = model if model is not None else TransformerLM(cfg)
        self._rng_state = None
        # train.compile: the training step calls a torch.compile'd view of the model (compiled at its first
        # call). Held in a tuple, so it is no submodule: state_dict() and checkpoints keep the model's own
        # keys (no `_orig_mod.`), and the curve's validation runs the model eagerly.
        self.compiled = (torch.compile(self.model),) if train.compile else None

    def training_step(self, batch, batch_idx):
        x, y = batch                                   # (B, T), (B, T)
        loss = lm_loss((self.compiled[0] if self.compiled else self.model)(x), y)
        moe = moe_losses(self.model)                   # MoE: mean aux and z-loss of its layers, this step
        # (no self.log of the loss: TrainingCurve sends train_loss, the mean since its last row, to the logger)
        if moe is None:
            return loss
        c = self.model.cfg
        total = loss + c.aux_loss_coef * moe["aux_loss"] + c.z_loss_coef * moe["z_loss"]
        self.log_dict({"train_total_loss": total, **moe})  # aux_loss, z_loss: unweighted
        self.log_dict({f"expert_load/{name.removesuffix('.mlp')}/{e}": f     # fraction of token slots
                       for name, layer in moe_layers(self.model) for e, f in enumerate(layer.load)})
        return {"loss": total, "lm_loss": loss.detach()}  # TrainingCurve's train_loss stays the LM loss

    def configure_optimizers(self):
        t = self.train_params
        decay = [p for p in self.parameters() if p.dim() >= 2]    # matmuls and embeddings
        no_decay = [p for p in self.parameters() if p.dim() < 2]  # norms and biases
        # fused: one kernel updates every tensor of a group (torch's default on CPU is a Python loop over
        # them, ~2 ms a step of nanoGPT's CPU model); the same update, rounded in another order. Not under
        # Lightning's mixed precision with clipping, which it refuses for fused optimizers (they may unscale).
        trainer = self._trainer                    # None outside fit (benchmarks, tests)
        mixed = trainer is not None and str(trainer.precision).endswith("-mixed")
        fused = self.device.type in FUSED_ADAMW and not (mixed and t.grad_clip)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr, t.min_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Resume bit-identically: the global RNG (dropout) travels with the checkpoint.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        checkpoint["params_hash"] = self.params_hash

    def on_load_checkpoint(self, checkpoint):
        self._rng_state = checkpoint["torch_rng_state"]

    def on_train_start(self):
        if self._rng_state is not None:
            torch.set_rng_state(self._rng_state)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file, then rename it: a run killed mid-save keeps the
    previous complete checkpoint instead of a torn one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        tmp = f"{path}.tmp-{os.getpid()}"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class StepCheckpoint(L.Callback):
    """Save `path` every `every` steps, so a killed run resumes from its last multiple of `every`.
    (Lightning's ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when fit
    ends.) Runs after the step's optimizer and lr-scheduler updates and after the callbacks
    listed before it (the curve), so everything the next step needs is in the file."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.path)              # every rank calls it; global rank 0 writes


COMPILE_REF_STEPS = 3            # train.compile: the steps after the first that compile_s compares it with


class TrainingCurve(Curve, L.Callback):
    """The Curve (components/curve.py) as Lightning callback: every `eval_every` steps and at the last
    step one row with the validation loss on fixed windows, the mean train loss since the previous row
    and the lr; tokens/s goes to the logger with each row. Rows, partial sums and train seconds survive
    resume (state_dict)."""

    def on_train_start(self, trainer, pl_module):
        self.ran_on = {"device": device_name(pl_module.device), "world_size": trainer.world_size,
                       "precision": str(trainer.precision)}
        self._compiled = getattr(pl_module, "compiled", None) is not None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_t0 = time.perf_counter()
        if self._t0 is None:
            self._t0 = self._step_t0

    def _time_compile(self, trainer) -> None:
        """train.compile: compile_s is the extra time of this process's first step (torch.compile works
        then: its forward and backward graphs) over the median of the next COMPILE_REF_STEPS steps (fewer
        if the run ends first), taken out of the training seconds, so tokens_per_s excludes it. A process
        that runs one step only cannot separate them: compile_s is that step's time, train_seconds keeps it
        too. Summed over resumes (each process compiles again)."""
        if not self._first_steps:
            self._rows_at_first = len(self.rows)
        self._first_steps.append(time.perf_counter() - self._step_t0)
        if len(self._first_steps) == 1 + COMPILE_REF_STEPS or trainer.global_step == self.max_steps:
            first, rest = self._first_steps[0], self._first_steps[1:]
            extra = max(0.0, first - float(np.median(rest))) if rest else first
            self.compile_s += extra
            if rest and len(self.rows) == self._rows_at_first:
                self._t0 += extra                    # the first step is in the row being timed: out of it
            elif rest:
                self.seconds -= extra                # it is in rows already summed
            self._first_steps.append(math.nan)       # done: no more steps are timed for it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._compiled and len(self._first_steps) <= COMPILE_REF_STEPS:
            self._time_compile(trainer)
        self._loss_sum += outputs.get("lm_loss", outputs["loss"]).item()   # MoE: without the aux losses
        self._steps += 1
        step = trainer.global_step
        if step % self.eval_every and step != self.max_steps:
            return
        dt = time.perf_counter() - self._t0
        self.seconds += dt
        row = {"step": step, "tokens": step * self.tokens_per_step,
               "train_loss": self._loss_sum / self._steps, "val_loss": self.val_loss(pl_module.model),
               "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        self.rows.append(row)
        tokens_per_s = self._steps * self.tokens_per_step / dt
        if trainer.logger:
            trainer.logger.log_metrics({k: v for k, v in row.items() if k != "step"}
                                       | {"tokens_per_s": tokens_per_s}, step=step)
        if trainer.is_global_zero:        # the console's progress: a line a row (no progress bar)
            print(f"  step {step:>{len(str(self.max_steps))}}/{self.max_steps}  train_loss {row['train_loss']:.4f}  "
                  f"val_loss {row['val_loss']:.4f}  lr {row['lr']:.2e}  {tokens_per_s:,.0f} tokens/s", flush=True)
        self._loss_sum, self._steps, self._t0 = 0.0, 0, time.perf_counter()

    def state_dict(self):     # seconds include the steps since the last row, whose partial sums travel too
        partial = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return {"rows": self.rows, "seconds": self.seconds + partial, "loss_sum": self._loss_sum, "steps": self._steps,
                "compile_s": self.compile_s}

    def load_state_dict(self, state):
        self.rows, self.seconds, self._loss_sum, self._steps = (
            state["rows"], state["seconds"], state["loss_sum"], state["steps"])
        self.compile_s = state.get("compile_s", 0.0)      # checkpoints from before train.compile have none


class LMDataModule(L.LightningDataModule):
    """Training batches by step, from the trainer's step on (one endless epoch; max_steps ends it).
    `split`: "train", or "domains/<name>/train" for one domain (branch training)."""

    def __init__(self, prepared, block_size, batch_size, seed, split="train"):
        super().__init__()
        self.prepared, self.block_size, self.batch_size = prepared, block_size, batch_size
        self.seed, self.split = seed, split

    def train_dataloader(self):
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        ds = StepBatches(load_tokens(self.prepared, self.split), self.block_size, self.batch_size, self.seed,
                         rank, world)
        start = (lambda: self.trainer.global_step) if self.trainer else (lambda: 0)
        return DataLoader(ds, batch_size=None, sampler=StepsFrom(start), num_workers=0)


def resume_step(ckpt: Path, params_hash: str) -> int:
    """The step to resume from: that of a checkpoint made with the same inputs (`params_hash`), else 0."""
    if not ckpt.exists():
        return 0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)   # tensors and plain data: no code runs
    except Exception as e:  # cut short, or holding objects other than those: start over, say so
        print(f"ignoring unreadable checkpoint {ckpt} ({e}); training from step 0")
        return 0
    if state.get("params_hash") != params_hash:
        print(f"ignoring {ckpt}: it was made with other params, data or code; training from step 0")
        return 0
    print(f"resuming from {ckpt} at step {state['global_step']}")
    return state["global_step"]


def launcher() -> tuple[str, int, int] | None:
    """The launcher that started this process on every node, as Lightning detects it (its own cluster
    environments, in its order: torchrun first, then srun): (name, nodes, processes in all), else None.
    torchrun sets TORCHELASTIC_RUN_ID, WORLD_SIZE and GROUP_WORLD_SIZE (its --nnodes); srun sets
    SLURM_NTASKS and SLURM_NNODES (not in a job named `bash` or `interactive`, which Lightning ignores)."""
    if TorchElasticEnvironment.detect():
        return "torchrun", int(os.environ.get("GROUP_WORLD_SIZE", 1)), int(os.environ["WORLD_SIZE"])
    if SLURMEnvironment.detect():
        return "srun", int(os.environ.get("SLURM_NNODES", 1)), int(os.environ["SLURM_NTASKS"])
    return None


def _stage_command() -> str:
    """This stage's command line, e.g. `-m tasks.pretrain parallel`, for the messages below."""
    import __main__
    spec = getattr(__main__, "__spec__", None)
    return " ".join([f"-m {spec.name}" if spec else "<stage>.py", *sys.argv[1:]])


def check_launcher(train: TrainParams, world_size: int | None = None) -> None:
    """Raise one ParamsError, before any training, if train.num_nodes > 1 but no launcher started the
    stage on each node (Lightning alone would wait forever for the other nodes), or if a launcher's
    world is not the params' (every process would train a model of its own, or hang): train.num_nodes
    nodes of train.devices processes each. `world_size`: the processes the Trainer asks for, once
    built (devices "auto" or -1 resolved); before, an integer train.devices is checked. Lightning itself
    checks only DDP's world, and only at fit, after the MLflow run has opened."""
    found, cmd = launcher(), _stage_command()
    devices = train.devices if isinstance(train.devices, int) and train.devices > 0 else None
    if found is None:
        if train.num_nodes > 1:
            n, per = train.num_nodes, devices or "<devices per node>"
            raise ParamsError(
                f"train.num_nodes={n} needs a launcher that starts this stage on each of the {n} nodes, and none "
                f"did: neither torchrun's (TORCHELASTIC_RUN_ID) nor srun's (SLURM_NTASKS) environment variables "
                f"are set. On each node run `torchrun --nnodes {n} --node_rank <0..{n - 1}> --nproc_per_node {per} "
                f"--master_addr <node 0's address> --master_port 29500 {cmd}`, or in a SLURM job with "
                f"--nodes={n} --ntasks-per-node={per}: `srun python {cmd}` (docs/multinode.md); "
                f"or set train.num_nodes: 1 to train on this machine")
        return
    name, nodes, world = found
    per = world // max(nodes, 1)
    if nodes != train.num_nodes or world != (world_size or (train.num_nodes * devices if devices else world)):
        resolved = f" = {world_size} process(es) in all" if world_size else ""
        raise ParamsError(
            f"{name} started {world} process(es) on {nodes} node(s) ({per} a node), but params.yaml asks for "
            f"train.num_nodes: {train.num_nodes} x train.devices: {train.devices}{resolved}: set "
            f"train.num_nodes: {nodes} and train.devices: {per}, or launch as many nodes and processes "
            f"a node as params.yaml asks for")


def make_trainer(train: TrainParams, ckpt_dir: Path, callbacks: list, logger, n_embd: int = 0) -> L.Trainer:
    """The Trainer every training stage uses: `train` settings, a resumable checkpoint every
    ckpt_every steps in ckpt_dir (outside DVC outs), no Lightning validation loop (the curve callback does it).
    precision auto is resolved for a model `n_embd` wide (0: unknown, 32-true), said once on the console
    and recorded as the MLflow param train.precision_resolved (metrics/train/ records Lightning's)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)   # no banners, tips or GPU/TPU lines
    precision, why = resolve_precision(train.precision, train.accelerator, n_embd)
    if global_rank0():            # once, from the process that writes outputs
        print(f"precision {precision} (train.precision: {train.precision}; {why})"
              + ("; torch.compile on: compile_s in metrics/train/" if train.compile else ""), flush=True)
        if logger:
            logger.log_hyperparams({"train.precision_resolved": precision})
    trainer = L.Trainer(
        accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
        strategy=train.strategy, precision=precision, deterministic=train.deterministic,
        max_steps=train.max_steps, max_epochs=-1, gradient_clip_val=train.grad_clip or None,
        use_distributed_sampler=False,          # each rank slices the global batch itself
        callbacks=[*callbacks, StepCheckpoint(ckpt_dir / "last.ckpt", train.ckpt_every)],
        enable_checkpointing=False, plugins=[AtomicCheckpointIO()], logger=logger,
        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=False,              # it counts epochs of an endless one; TrainingCurve prints steps
        log_every_n_steps=min(50, train.ckpt_every))
    check_launcher(train, trainer.num_nodes * trainer.num_devices)   # devices "auto" resolved; no processes yet
    return trainer


def fit(lit: LitLM, data: LMDataModule, curve: TrainingCurve, train: TrainParams, ckpt_dir: Path,
        params_hash: str, logger) -> bool:
    """Train `lit` train.max_steps steps (0: none) with the curve, resuming from ckpt_dir/last.ckpt if
    an interrupted run with the same inputs (params_hash) left it; `logger`: Lightning's, or False.
    Returns whether this process is global rank 0."""
    check_launcher(train)
    if not train.max_steps:
        return global_rank0()
    ckpt = ckpt_dir / "last.ckpt"
    start_step = resume_step(ckpt, params_hash)
    start = time.perf_counter()
    trainer = make_trainer(train, ckpt_dir, [curve], logger, lit.model.cfg.n_embd)
    trainer.fit(lit, datamodule=data, ckpt_path=ckpt if start_step else None, weights_only=True)
    curve.fit_seconds = time.perf_counter() - start      # the stage's work, for its summary line's clock
    return trainer.is_global_zero
