"""Knowledge distillation: the KD loss (Hinton), a student initialised from every other teacher layer
(DistilBERT), and LitDistill, the LightningModule that trains a student on a frozen teacher's outputs.

    loss = (1 - alpha) * CE(y, z_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
           [+ hidden_weight * (1 - cos(P h_s, h_t))]

The teacher is any model of the study, used as a black box `logits = teacher(x)` (only the
hidden-state term also calls `teacher.hidden(x)`). Used by tasks/distill.py; the compression
stage may use LitDistill for recovery training:

    lit = LitDistill(student, teacher, train, params_hash, alpha=0.5, temperature=2.0)
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from components.lit import LitLM
from components.errors import ParamsError
from components.model import TransformerLM, lm_loss, moe_losses

if TYPE_CHECKING:                     # only the type: the schema is not needed to train
    from components.params import TrainParams

KD_CHUNK = 1024     # positions per KD chunk: bounds the fp32 (chunk, vocab) temporaries


def method_name(reverse: bool, hidden_weight: float) -> str:
    """meta.json's `method`: kd (forward KL), kd-reverse (reverse KL), either + "+hidden" with the cosine term."""
    return ("kd-reverse" if reverse else "kd") + ("+hidden" if hidden_weight > 0 else "")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            reverse: bool = False, chunk: int = KD_CHUNK) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) (reverse: KL(p_s || p_t)), p = softmax(logits / T), summed over the vocabulary
    and averaged over positions. Logits (..., V), any float dtype. Computed `chunk` positions at a time
    in fp32; each chunk is recomputed in backward (activation checkpointing), so only one chunk's
    fp32 (chunk, V) temporaries exist at once."""
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)   # (N, V)
    assert s.shape == t.shape, f"student logits {tuple(s.shape)} vs teacher logits {tuple(t.shape)}"
    total = sum(checkpoint(_kl_sum, s[i:i + chunk], t[i:i + chunk], temperature, reverse, use_reentrant=False)
                for i in range(0, s.size(0), chunk))
    return temperature ** 2 * total / s.size(0)


def _kl_sum(s: torch.Tensor, t: torch.Tensor, temperature: float, reverse: bool) -> torch.Tensor:
    """Sum over a chunk (n, V) of KL(p_t || p_s), or KL(p_s || p_t) when reverse."""
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.float() / temperature, dim=-1)
    if reverse:     # kl_div(input, target) = sum exp(target) * (target - input)
        return F.kl_div(log_pt, log_ps, reduction="sum", log_target=True)
    return F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)


def hidden_cosine_loss(h_student: torch.Tensor, h_teacher: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """Mean over positions of 1 - cos(proj(h_s), h_t); h_s (B, T, C_s), h_t (B, T, C_t), proj: C_s -> C_t."""
    return 1 - F.cosine_similarity(proj(h_student).float(), h_teacher.float(), dim=-1).mean()


def init_from_teacher(student: TransformerLM, teacher: TransformerLM) -> TransformerLM:
    """DistilBERT's init, in place: student block i <- teacher block 2i; every other weight (embeddings,
    final norm, head, a shared FFN) <- the teacher's of the same name. The student's config must be the
    teacher's with fewer layers (Study.student_config); any other difference is an error naming the weight."""
    src = teacher.state_dict()
    picked = {}
    for name, t in student.state_dict().items():
        from_name = re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{2 * int(m[1])}.", name)
        if from_name not in src or src[from_name].shape != t.shape:
            got = tuple(src[from_name].shape) if from_name in src else "no such weight"
            raise ParamsError(f"cannot initialise the student from its teacher: student {name} {tuple(t.shape)} "
                             f"<- teacher {from_name} ({got}); use init: scratch for this teacher")
        picked[name] = src[from_name]
    student.load_state_dict(picked)
    return student


class LitDistill(LitLM):
    """LitLM (same optimizer, schedule, checkpointed RNG) with a KD training step. `.model` is the student.
    The teacher is frozen, in eval mode, and held in a tuple: it is not a submodule, so it stays out of
    parameters() (the optimizer), state_dict() (checkpoints), DDP and Lightning's device moves
    (on_fit_start moves it). The hidden-state projection, when there is one, trains with the student."""

    def __init__(self, student: TransformerLM, teacher: TransformerLM, train: TrainParams, params_hash: str = "", *,
                 alpha: float = 0.5, temperature: float = 2.0, reverse: bool = False, hidden_weight: float = 0.0):
        super().__init__(student.cfg, train, params_hash, model=student)
        self.compiled = None            # the KD step calls the student's parts eagerly: train.compile does not apply
        if not 0.0 <= alpha <= 1.0 or temperature <= 0 or hidden_weight < 0:
            raise ValueError(f"alpha={alpha} must be in [0, 1], temperature={temperature} > 0 and "
                             f"hidden_weight={hidden_weight} >= 0")
        self.alpha, self.temperature, self.reverse, self.hidden_weight = alpha, temperature, reverse, hidden_weight
        self.frozen = (teacher.eval().requires_grad_(False),)
        c_s, c_t = student.cfg.n_embd, teacher.cfg.n_embd
        self.proj = None if hidden_weight == 0 else nn.Identity() if c_s == c_t else nn.Linear(c_s, c_t, bias=False)

    @property
    def teacher(self) -> TransformerLM:
        return self.frozen[0]

    def on_fit_start(self):
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        x, y = batch                                           # (B, T), (B, T)
        with torch.no_grad():
            t_hidden = self.teacher.hidden(x) if self.proj is not None else None   # (B, T, C_t)
            t_logits = self.teacher.lm_head(t_hidden) if t_hidden is not None else self.teacher(x)  # (B, T, V)
        s_hidden = self.model.hidden(x) if self.proj is not None else None          # (B, T, C_s)
        s_logits = self.model.lm_head(s_hidden) if s_hidden is not None else self.model(x)
        ce = lm_loss(s_logits, y)
        kd = kd_loss(s_logits, t_logits, self.temperature, self.reverse)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        logs = {"train_kd": kd}
        if self.proj is not None:
            logs["train_hidden"] = hidden_cosine_loss(s_hidden, t_hidden, self.proj)
            loss = loss + self.hidden_weight * logs["train_hidden"]
        if (moe := moe_losses(self.model)) is not None:   # an MoE student: its load-balancing and z-losses, as LitLM
            loss = loss + self.cfg.aux_loss_coef * moe["aux_loss"] + self.cfg.z_loss_coef * moe["z_loss"]
            logs |= moe
        self.log_dict({"train_total_loss": loss, **logs})   # (train_loss, the LM loss: TrainingCurve logs it)
        return {"loss": loss, "lm_loss": ce.detach()}     # TrainingCurve's train_loss is the LM loss too
