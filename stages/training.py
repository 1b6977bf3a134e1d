"""The one training loop, shared by pretraining and fine-tuning.

``train`` reads top to bottom in the order of one optimizer step: learning rate → evaluation
(every ``eval_interval`` steps and at the end) → ``grad_accum`` micro-steps → clip → step →
log → checkpoint. What differs between pretraining and fine-tuning stays outside: the caller
builds the model, passes a ``Batches`` object (``get(step, micro) -> (x, y)``, a pure function
of its arguments so a resumed run sees exactly the batches an uninterrupted one would) and an
``evaluate(model) -> {"val_loss": ...}`` callback. Targets equal to -100 are not scored, so
fine-tuning masks prompt tokens simply by writing -100 there.

Step numbers count completed optimizer steps: the evaluation "at step 0" scores the initial
weights, the checkpoint ``step_00000050`` holds the weights after 50 updates, and a run resumed
from it starts with update number 51.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages import checkpoint as ckpt
from stages.config import TrainConfig
from stages.errors import ConfigError, TrainingError
from stages.tracking import Tracker

IGNORE_INDEX = -100

Evaluate = Callable[[nn.Module], dict[str, float]]


class Batches(Protocol):
    """Training data as a pure function of (step, micro-step): CPU LongTensors (batch, length)."""

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainResult:
    """What one ``train`` call did. ``curve`` holds every logged point, for plots."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    initial_loss: float
    final_loss: float
    best_val_loss: float | None
    final_val_loss: float | None
    resumed_from: int | None = None
    curve: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Scalars only (no curve): what a stage manifest records."""
        data = asdict(self)
        data.pop("curve")
        return data


# --- devices, precision, optimizer, schedule -------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """'auto' → the first GPU when there is one, else the CPU; an unavailable GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r}: not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {name!r}: this machine has no usable CUDA GPU; use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device = {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"device = {name!r}: only 'cpu' and 'cuda' devices are supported")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on the CPU, where bf16 autocast is ~20x slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only.

    Decayed: 2-D+ weights of linear layers. Not decayed: norm gains (decay would pull them
    toward 0, not toward their natural value 1), biases, and embeddings — the tied
    embedding/head matrix gets a gradient row only when a token occurs, so for rare tokens
    decay would dominate their updates and shrink them toward zero.
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
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=on_cuda or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


# --- loss -------------------------------------------------------------------------------------


def token_loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets that are not -100 (fp32 logits for the softmax)."""
    logits = model(x)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss per scored token over ``batches`` (fixed held-out batches), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device):
                total += float(token_loss_sum(model, x, y))
            count += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TrainingError("evaluation batches hold no scored tokens (every target is -100)")
    return total / count


def _micro_steps(model: nn.Module, batches: Batches, step: int, accum: int, device: torch.device) -> tuple[float, int]:
    """Forward/backward over one step's micro-batches; returns (mean token loss, input tokens).

    Each micro-loss is divided by the step's total scored-token count, so 2 micro-batches of
    B/2 give the same gradient as one of B, even when fine-tuning masks a different number of
    targets in each.
    """
    pairs = [batches.get(step, micro) for micro in range(accum)]
    scored = sum(int((y != IGNORE_INDEX).sum()) for _, y in pairs)
    loss_total = torch.zeros((), device=device)
    tokens = 0
    for x, y in pairs:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = token_loss_sum(model, x, y) / max(scored, 1)
        loss.backward()
        loss_total += loss.detach()
        tokens += x.numel()
    return float(loss_total), tokens  # float(): one host sync per step, needed for the NaN check


# --- the loop ---------------------------------------------------------------------------------


def _not_finite(step: int, what: str, value: float, cfg: TrainConfig) -> TrainingError:
    return TrainingError(
        f"step {step + 1}: {what} is {value} (not finite); lower lr (now {cfg.lr:g}), raise warmup_steps "
        f"(now {cfg.warmup_steps}) or set grad_clip, then rerun"
    )


def train(
    model: nn.Module,
    batches: Batches,
    cfg: TrainConfig,
    tracker: Tracker,
    checkpoint_dir: Path | None = None,
    evaluate: Evaluate | None = None,
    metric_prefix: str = "",
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps (resuming when possible).

    The model is moved to ``cfg.device``. When ``checkpoint_dir`` holds a checkpoint, training
    continues from its step with its weights, optimizer, RNG and data cursor; a checkpoint is
    written every ``checkpoint_interval`` steps and after the last one. ``evaluate`` runs at
    step 0, every ``eval_interval`` steps and at the end; its ``val_loss`` becomes best/final.
    ``optimizer`` defaults to ``build_optimizer`` (after the move to the device); a caller's own
    one gets the scheduled lr times each group's optional ``lr_scale`` at every step.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model.to(device)
    model.train()
    optimizer = optimizer or build_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)  # dropout stream; weights were drawn by the caller

    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "train_seconds": 0.0,
                             "initial_loss": None, "final_loss": None, "best_val_loss": None, "final_val_loss": None,
                             "curve": []}
    resumed_from = None
    latest = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if latest is not None:
        saved = ckpt.load_checkpoint(latest, model, optimizer)
        state.update({k: saved[k] for k in state if k in saved})
        ckpt.set_rng_state(saved["rng"])
        if saved.get("data") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(saved["data"])
        resumed_from = state["step"]
    if state["step"] > cfg.max_steps:
        raise TrainingError(
            f"{latest}: checkpoint is at step {state['step']}, beyond max_steps={cfg.max_steps}; "
            "raise max_steps or use an empty checkpoint directory"
        )

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        model.eval()  # no dropout while scoring; the callback need not remember to do this
        try:
            with torch.no_grad(), autocast(device):
                results = {k: float(v) for k, v in evaluate(model).items()}
        finally:
            model.train()
        if "val_loss" in results:
            val = results["val_loss"]
            state["final_val_loss"] = val
            if state["best_val_loss"] is None or val < state["best_val_loss"]:
                state["best_val_loss"] = val
        state["curve"].append({"step": step, **results})
        tracker.log_metrics({metric_prefix + k: v for k, v in results.items()}, step=step)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), file=sys.stderr)

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        saved = {
            **state,
            "rng": ckpt.rng_state(),
            # Batches are a function of the step, so the step is the data cursor; stateful
            # batch sources may add their own state through state_dict()/load_state_dict().
            "data": batches.state_dict() if hasattr(batches, "state_dict") else {"cursor": "step", "step": step},
            "schedule": {"kind": "warmup-cosine", "next_lr": lr_at(step, cfg), "max_steps": cfg.max_steps},
        }
        ckpt.save_checkpoint(Path(checkpoint_dir) / ckpt.step_dirname(step), model, optimizer, saved)
        ckpt.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)

    started = time.perf_counter() - state["seconds"]
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=metric_prefix.rstrip("/") or "train",
               file=sys.stderr, disable=not progress, mininterval=1.0, dynamic_ncols=True)
    try:
        for step in range(state["step"], cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:  # lr_scale lets a caller give a group its own multiple
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if step % cfg.eval_interval == 0:
                run_eval(step)

            t0 = time.perf_counter()
            loss, tokens = _micro_steps(model, batches, step, cfg.grad_accum, device)
            if not math.isfinite(loss):
                raise _not_finite(step, "the training loss", loss, cfg)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            if not math.isfinite(grad_norm):
                raise _not_finite(step, "the gradient norm", grad_norm, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0

            done = step + 1
            state["step"], state["tokens"] = done, state["tokens"] + tokens
            state["train_seconds"] += elapsed
            if state["initial_loss"] is None:
                state["initial_loss"] = loss
            window_loss, window_steps = window_loss + loss, window_steps + 1
            window_tokens, window_time = window_tokens + tokens, window_time + elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}", refresh=False)

            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                point = {"step": done, "train_loss": window_loss / window_steps, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(window_time, 1e-9),
                         "tokens": state["tokens"]}
                state["curve"].append(point)
                tracker.log_metrics({metric_prefix + k: v for k, v in point.items() if k != "step"}, step=done)
                window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
            state["final_loss"] = loss
            state["seconds"] = time.perf_counter() - started
            if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done < cfg.max_steps:
                save(done)

        run_eval(cfg.max_steps)
        state["seconds"] = time.perf_counter() - started
        save(cfg.max_steps)
    finally:
        bar.close()

    return TrainResult(
        steps=state["step"],
        tokens=state["tokens"],
        seconds=round(state["seconds"], 3),
        tokens_per_s=state["tokens"] / max(state["train_seconds"], 1e-9),
        initial_loss=float("nan") if state["initial_loss"] is None else state["initial_loss"],
        final_loss=float("nan") if state["final_loss"] is None else state["final_loss"],
        best_val_loss=state["best_val_loss"],
        final_val_loss=state["final_val_loss"],
        resumed_from=resumed_from,
        curve=state["curve"],
    )
