"""The optimizer and its learning-rate schedule: AdamW with decay on matrices only, warmup + cosine.

Both are pure functions of the recipe's ``TrainConfig``, so a resumed run recomputes exactly the
learning rate an uninterrupted one would have used at every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stages.core.errors import TrainingError
from stages.core.sections import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only.

    Decayed: 2-D+ weights of linear layers. Not decayed: norm gains (decay would pull them
    toward 0, not toward their natural value 1), biases, and embeddings — the tied
    embedding/head matrix gets a gradient row only when a token occurs, so for rare tokens
    decay would dominate their updates and shrink them toward zero.
    ``fused`` picks the single-kernel AdamW (None: on when every parameter is on CUDA).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainingError("the model has no trainable parameters (all have requires_grad=False)")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Give every group update ``step``'s learning rate; returns it."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
