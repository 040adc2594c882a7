"""Knowledge distillation while re-tuning a pruned model (prune.distill): the unpruned tuned
model is the teacher, run forward only, partitioned under ZeRO-3 like the student; its logits
live for one micro-batch.

    loss = lm_weight x CE(student, labels) + kl_weight x T^2 x KL(softmax(t / T) || softmax(s / T))

The KL is the mean over the label tokens (the positions the CE is taken on, after the one-token
shift), so instruction data distils on answers only. T^2 keeps the soft term's gradient scale
independent of T (Hinton et al. 2015).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from ..data import IGNORE


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """T^2 x mean over label tokens of KL(teacher_T || student_T); logits (batch, seq, vocab)."""
    keep = labels[:, 1:] != IGNORE
    if not bool(keep.any()):
        return student.sum() * 0.0
    s = student[:, :-1][keep].float() / temperature
    t = teacher[:, :-1][keep].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def teacher_engine(model: torch.nn.Module, ds: dict) -> Any:
    """A forward-only DeepSpeed engine for the (frozen) teacher: the student's config without
    optimizer, scheduler or optimizer offload, so ZeRO-3 partitions and gathers it the same way."""
    import deepspeed

    cfg = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    cfg.get("zero_optimization", {}).pop("offload_optimizer", None)
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine
