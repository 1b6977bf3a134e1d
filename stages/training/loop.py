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

from stages.training import checkpoint as ckpt
from stages.training import distributed
from stages.training import perf
from stages.training.batches import for_rank
from stages.core.config import TrainConfig
from stages.core.errors import ConfigError, TrainingError
from stages.core.progress import progress_bar
from stages.training.perf import autocast_for as autocast
from stages.training.perf import resolve_device
from stages.core.tracking import Tracker

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
    # Hardware use: model FLOPs, MFU against the peak named in peak_source, memory high-water.
    flops_per_token: float = 0.0
    total_flops: float = 0.0
    mfu: float = 0.0
    peak_flops: float = 0.0
    peak_source: str = ""
    peak_memory_mb: float = 0.0
    world_size: int = 1
    precision: str = "fp32"
    compiled: bool = False

    def summary(self) -> dict[str, Any]:
        """Scalars only (no curve): what a stage manifest records."""
        data = asdict(self)
        data.pop("curve")
        return data


# --- devices, precision, optimizer, schedule -------------------------------------------------


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


def _micro_steps(model: nn.Module, batches: Batches, step: int, accum: int, device: torch.device,
                 plan: perf.PerfPlan, scaler: torch.amp.GradScaler, world: int) -> tuple[float, int]:
    """Forward/backward over one step's micro-batches; returns (this rank's share of the mean
    token loss, this rank's input tokens).

    Each micro-loss is divided by the step's total scored-token count — over all ranks — so 2
    micro-batches of B/2, or 2 ranks of B/2, give the same gradient as one batch of B, even when
    fine-tuning masks a different number of targets in each. DDP/FSDP average gradients over
    ranks, so each rank's loss is scaled by the world size to turn that mean into the sum.
    """
    pairs = [batches.get(step, micro) for micro in range(accum)]
    scored = sum(int((y != IGNORE_INDEX).sum()) for _, y in pairs)
    if world > 1:
        scored = int(distributed.all_reduce_sum([scored], device)[0])
    loss_total = torch.zeros((), device=device)
    tokens = 0
    for micro, (x, y) in enumerate(pairs):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with distributed.set_gradient_sync(model, micro == accum - 1):
            with perf.autocast(plan):
                loss = token_loss_sum(model, x, y) / max(scored, 1)
            scaler.scale(loss * world if world > 1 else loss).backward()
        loss_total += loss.detach()
        tokens += x.numel()
    return float(loss_total), tokens  # float(): one host sync per step, needed for the NaN check


# --- the loop ---------------------------------------------------------------------------------


class Preempted(TrainingError):
    """SIGTERM stopped training after a checkpoint was written; rerunning resumes from it."""

    transient = True  # an orchestrator may retry at once: the retry resumes, it does not repeat


def _not_finite(step: int, what: str, value: float, cfg: TrainConfig, checkpoint_dir: Path | None) -> TrainingError:
    last = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    kept = f"; the last good checkpoint {last} is kept and a rerun resumes from it" if last else ""
    return TrainingError(
        f"step {step + 1}: {what} is {value} (not finite); lower lr (now {cfg.lr:g}), raise warmup_steps "
        f"(now {cfg.warmup_steps}) or set grad_clip, then rerun{kept}"
    )


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


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
    written every ``checkpoint_interval`` steps, after the last one, and when SIGTERM arrives
    (then ``Preempted`` is raised). ``evaluate`` runs at step 0, every ``eval_interval`` steps
    and at the end; its ``val_loss`` becomes best/final. ``optimizer`` defaults to
    ``build_optimizer`` (after the move to the device); a caller's own one gets the scheduled lr
    times each group's optional ``lr_scale`` at every step.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: each trains on its own slice of
    the batches (``batch_size`` is per rank), gradients are averaged by DDP or FSDP2
    (``cfg.parallel``), and rank 0 alone logs and writes checkpoints.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info, device = distributed.setup(resolve_device(cfg.device))
    plan = perf.plan(cfg, device)
    if optimizer is not None and info.enabled and cfg.parallel == "fsdp":
        raise ConfigError("parallel = 'fsdp': train() builds the optimizer over the sharded weights; "
                          "use parallel: ddp with a custom optimizer")
    batches = for_rank(batches, info.rank, info.world_size)
    gpt = ckpt.find_gpt(model)
    flops_per_token = float(gpt.flops_per_token()) if gpt is not None else 0.0
    peak, peak_source = perf.peak_flops(device, cfg.peak_flops, plan.amp_dtype)
    if not info.is_main:
        tracker, progress = distributed.SilentTracker(), False  # rank 0 alone reports
    model.to(device)
    model.train()
    with perf.backend_flags(plan), distributed.PreemptionGuard() as guard:
        net = distributed.parallelize(model, plan, info, cfg.parallel)
        optimizer = optimizer or build_optimizer(net, cfg, fused=plan.fused_optimizer)
        scaler = torch.amp.GradScaler(device.type, enabled=plan.grad_scaler)
        tracker.log_params({f"{metric_prefix}{k}": v for k, v in plan.describe().items()}
                           | {f"{metric_prefix}perf.peak_flops": f"{peak:.4g}", f"{metric_prefix}perf.peak_source": peak_source,
                              f"{metric_prefix}perf.world_size": info.world_size,
                              f"{metric_prefix}perf.flops_per_token": flops_per_token})
        return _loop(net, optimizer, scaler, batches, cfg, tracker, checkpoint_dir, evaluate, metric_prefix,
                     progress, info, device, plan, guard,
                     {"flops_per_token": flops_per_token, "peak_flops": peak, "peak_source": peak_source})


def _loop(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batches: Batches,
          cfg: TrainConfig, tracker: Tracker, checkpoint_dir: Path | None, evaluate: Evaluate | None,
          metric_prefix: str, progress: bool, info: distributed.DistInfo, device: torch.device,
          plan: perf.PerfPlan, guard: distributed.PreemptionGuard, hw: dict[str, Any]) -> TrainResult:
    world = info.world_size
    torch.manual_seed(cfg.seed)  # dropout stream; weights were drawn by the caller
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "train_seconds": 0.0,
                             "initial_loss": None, "final_loss": None, "best_val_loss": None, "final_val_loss": None,
                             "curve": [], "window": [0.0, 0, 0, 0.0], "world_size": world}
    resumed_from = None
    latest = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if world > 1 and not distributed.same_on_all_ranks(-1 if latest is None else int(latest.name[5:]), device):
        raise TrainingError(f"{checkpoint_dir}: the ranks see different checkpoints; on several nodes the artifact "
                            "store must be shared (s3:// or a shared filesystem) so every rank resumes from the same one")
    if latest is not None:
        saved = ckpt.load_checkpoint(latest, distributed.unwrap(net), optimizer)
        if saved.get("world_size", 1) != world and info.is_main:
            sys.stderr.write(f"warning: {latest} was written by {saved.get('world_size', 1)} process(es), this run has "
                             f"{world}: the global batch changes, so the continuation is not exact\n")
        state.update({k: saved[k] for k in state if k in saved and k != "world_size"})
        ckpt.set_rng_state(saved["rng"])
        if saved.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
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
        net.eval()  # no dropout while scoring; the callback need not remember to do this
        try:
            with torch.no_grad(), perf.autocast(plan):
                results = {k: float(v) for k, v in evaluate(net).items()}
        finally:
            net.train()
        if "val_loss" in results:
            val = results["val_loss"]
            state["final_val_loss"] = val
            if state["best_val_loss"] is None or val < state["best_val_loss"]:
                state["best_val_loss"] = val
        state["curve"].append({"step": step, **results})
        tracker.log_metrics({metric_prefix + k: v for k, v in results.items()}, step=step)
        if progress:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), file=sys.stderr)

    def save(step: int) -> Path | None:
        if checkpoint_dir is None:
            return None
        directory = Path(checkpoint_dir) / ckpt.step_dirname(step)
        if distributed.is_fsdp(net):
            weights, optim_state = ckpt.gather_full_state(net, optimizer)  # collective: every rank
        else:
            weights, optim_state = distributed.unwrap(net), None
        if info.is_main:
            saved = {
                **state,
                "rng": ckpt.rng_state(),
                # Batches are a function of the step, so the step is the data cursor; stateful
                # batch sources may add their own state through state_dict()/load_state_dict().
                "data": batches.state_dict() if hasattr(batches, "state_dict") else {"cursor": "step", "step": step},
                "schedule": {"kind": "warmup-cosine", "next_lr": lr_at(step, cfg), "max_steps": cfg.max_steps},
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            }
            ckpt.save_checkpoint(directory, weights, optimizer, saved, optimizer_state=optim_state)
            ckpt.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
        distributed.barrier()  # no rank may exit (or be killed by torchrun) while rank 0 writes
        return directory

    started = time.perf_counter() - state["seconds"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = progress_bar(total=cfg.max_steps, initial=state["step"], desc=metric_prefix.rstrip("/") or "train", file=sys.stderr,
                       disable=not progress, mininterval=1.0, dynamic_ncols=True, every=cfg.log_interval)
    try:
        for step in range(state["step"], cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:  # lr_scale lets a caller give a group its own multiple
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if step % cfg.eval_interval == 0:
                run_eval(step)

            t0 = time.perf_counter()
            loss, tokens = _micro_steps(net, batches, step, cfg.grad_accum, device, plan, scaler, world)
            stop = guard.requested
            if world > 1:  # one collective: the global mean loss, and whether any rank got SIGTERM
                loss, stops = distributed.all_reduce_sum([loss, float(stop)], device)
                stop, tokens = stops > 0, tokens * world
            if not math.isfinite(loss):
                raise _not_finite(step, "the training loss", loss, cfg, checkpoint_dir)
            scaler.unscale_(optimizer)
            grad_norm = _grad_norm(params, cfg.grad_clip)
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # the fp16 scaler skips such steps itself
                raise _not_finite(step, "the gradient norm", grad_norm, cfg, checkpoint_dir)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0

            done = step + 1
            state["step"], state["tokens"] = done, state["tokens"] + tokens
            state["train_seconds"] += elapsed
            if state["initial_loss"] is None:
                state["initial_loss"] = loss
            window = state["window"]  # in the checkpoint, so a resumed run logs the same averages
            window[0], window[1], window[2], window[3] = window[0] + loss, window[1] + 1, window[2] + tokens, window[3] + elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window[2] / max(window[3], 1e-9):,.0f}", refresh=False)

            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                tokens_per_s = window[2] / max(window[3], 1e-9)
                point = {"step": done, "train_loss": window[0] / window[1], "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tokens": state["tokens"],
                         "mfu": perf.mfu(tokens_per_s, hw["flops_per_token"], hw["peak_flops"], world),
                         "peak_memory_mb": perf.peak_memory_mb(device)}
                state["curve"].append(point)
                tracker.log_metrics({metric_prefix + k: v for k, v in point.items() if k != "step"}, step=done)
                state["window"] = [0.0, 0, 0, 0.0]
            state["final_loss"] = loss
            state["seconds"] = time.perf_counter() - started
            stop = stop or (world == 1 and guard.requested)  # alone, a signal during logging counts now
            if stop and done < cfg.max_steps:
                written = save(done)
                where = f"checkpoint {written} written; rerun the same command to resume" if written else \
                    "no checkpoint directory, so this run's progress is lost"
                raise Preempted(f"stopped by SIGTERM after step {done} of {cfg.max_steps}: {where}")
            if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done < cfg.max_steps:
                save(done)

        run_eval(cfg.max_steps)
        state["seconds"] = time.perf_counter() - started
        save(cfg.max_steps)
    finally:
        bar.close()

    tokens_per_s = state["tokens"] / max(state["train_seconds"], 1e-9)
    return TrainResult(
        steps=state["step"],
        tokens=state["tokens"],
        seconds=round(state["seconds"], 3),
        tokens_per_s=tokens_per_s,
        initial_loss=float("nan") if state["initial_loss"] is None else state["initial_loss"],
        final_loss=float("nan") if state["final_loss"] is None else state["final_loss"],
        best_val_loss=state["best_val_loss"],
        final_val_loss=state["final_val_loss"],
        resumed_from=resumed_from,
        curve=state["curve"],
        flops_per_token=hw["flops_per_token"],
        total_flops=hw["flops_per_token"] * state["tokens"],
        mfu=perf.mfu(tokens_per_s, hw["flops_per_token"], hw["peak_flops"], world),
        peak_flops=hw["peak_flops"],
        peak_source=hw["peak_source"],
        peak_memory_mb=round(perf.peak_memory_mb(device), 1),
        world_size=world,
        precision={None: "fp32", "bfloat16": "bf16", "float16": "fp16"}[plan.amp_dtype],
        compiled=plan.compile,
    )
