"""The one training loop, shared by pretraining and fine-tuning.

``train`` sets a run up (device, precision, parallelism, optimizer, checkpointer, reporting),
resumes from the newest checkpoint and hands over to ``_loop``, which reads in the order of one
optimizer step: learning rate → evaluation (every ``eval_interval`` steps and at the end) → the
update (``grad_accum`` micro-steps, clip, step) → logging → checkpoint, each a named function.
That checkpoint step calls the ``Checkpointer`` (``checkpoint_policy.py``) after every update;
it decides whether one is due (every ``checkpoint_interval`` steps, the last step, a stop request)
and which ones stay on disk. A stop request — SIGTERM, SIGINT or a preemption notice, gathered by
``preemption.PreemptionGuard`` — is read at each step boundary: the step ends, its checkpoint is
written and ``Preempted`` says how to resume.
What a step carries to the next is a ``TrainState`` — exactly what a checkpoint carries on.

What differs between pretraining and fine-tuning stays outside: the caller builds the model,
passes a ``Batches`` object (``get(step, micro) -> (x, y)``, a pure function of its arguments so
a resumed run sees exactly the batches an uninterrupted one would) and an
``evaluate(model) -> {"val_loss": ...}`` callback. Targets equal to ``IGNORE`` (-100) are not
scored, so fine-tuning masks prompt tokens simply by writing -100 there.

Step numbers count completed optimizer steps: the evaluation "at step 0" scores the initial
weights, the checkpoint ``step_00000050`` holds the weights after 50 updates, and a run resumed
from it starts with update number 51.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stages.core.errors import TrainingError
from stages.core.progress import Progress, progress_bar
from stages.core.sections import TrainConfig
from stages.core.tracking import Tracker
from stages.lm.targets import IGNORE
from stages.training import distributed, perf
from stages.training.batches import for_rank
from stages.training.checkpoint_format import find_gpt
from stages.training.checkpoint_mirror import CheckpointMirror
from stages.training.checkpoint_policy import Checkpointer
from stages.training.loss import token_loss_sum
from stages.training.optimizer import build_optimizer, lr_at, set_lr
from stages.training.perf import resolve_device
from stages.training.preemption import Preempted, PreemptionGuard
from stages.training.state import Hardware, LogWindow, TrainResult, TrainState, Update

log = logging.getLogger("gptpipe.train")

Evaluate = Callable[[nn.Module], dict[str, float]]


class Batches(Protocol):
    """Training data as a pure function of (step, micro-step): CPU LongTensors (batch, length)."""

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# --- reporting: tracker, progress bar, one-line notes (rank 0 only) ---------------------------


def _progress_bar(name: str, total: int, initial: int, enabled: bool, every: int) -> Progress:
    """The run's progress on stderr: a tqdm bar on a terminal, a line every ``every`` steps in a log file."""
    return progress_bar(
        total=total,
        initial=initial,
        desc=name,
        file=sys.stderr,
        disable=not enabled,
        mininterval=1.0,
        dynamic_ncols=True,
        every=every,
    )


@dataclass(frozen=True)
class Display:
    """How one training run shows itself: ``name`` labels its progress bar and its resume line,
    ``metric_prefix`` goes before every tracked param and metric (``finetune/``), and ``progress``
    turns the bar (or, in a log, its lines) on or off."""

    name: str = "train"
    metric_prefix: str = ""
    progress: bool = True


class _Report:
    """Where a run's numbers go: the tracker (names prefixed), the progress bar and one-line notes.

    On ranks other than 0 everything is silent: they compute the same numbers, rank 0 reports them.
    """

    def __init__(self, tracker: Tracker, display: Display, main: bool):
        self.tracker = tracker if main else distributed.SilentTracker()
        self.prefix, self.name, self.main = display.metric_prefix, display.name, main
        self.progress = display.progress and main
        self.bar: Progress | None = None

    def params(self, values: dict[str, Any]) -> None:
        self.tracker.log_params({self.prefix + k: v for k, v in values.items()})

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.tracker.log_metrics({self.prefix + k: v for k, v in values.items()}, step=step)

    def note(self, line: str) -> None:
        """A line beside the progress bar (evaluation results), shown only with the bar."""
        if self.progress and self.bar is not None:
            self.bar.write(line, file=sys.stderr)

    def announce(self, line: str) -> None:
        """A line that must be seen: to the log when something handles it (the stage CLI, Prefect), else stderr."""
        if not self.main:
            return
        log.info(line)
        if not log.hasHandlers():
            print(line, file=sys.stderr, flush=True)

    def start_bar(self, total: int, initial: int, every: int) -> Progress:
        self.bar = _progress_bar(self.name, total, initial, self.progress, every)
        return self.bar

    def advance(self, update: Update, window: LogWindow) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{update.loss:.3f}", tok_s=f"{window.tokens_per_s:,.0f}", refresh=False)


# --- the run and its steps --------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one ``train`` call set up, handed to each step of the loop."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Batches
    cfg: TrainConfig
    settings: perf.RuntimeSettings
    info: distributed.DistInfo
    device: torch.device
    hardware: Hardware
    evaluate: Evaluate | None
    report: _Report
    checkpointer: Checkpointer
    guard: PreemptionGuard
    params: list[torch.Tensor] = field(init=False)  # what the gradient norm is taken over

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]


def _loop(run: _Run, state: TrainState) -> None:
    """Optimizer steps from ``state.step`` to ``max_steps``; the last one ends with the final evaluation.

    The checkpointer sees every step and decides whether to write it; a stop request makes it write at once.
    """
    cfg, started = run.cfg, time.perf_counter() - state.seconds
    trainer_state = partial(_trainer_state, run, state)
    with run.report.start_bar(cfg.max_steps, state.step, cfg.log_interval):
        for step in range(state.step, cfg.max_steps):
            lr = set_lr(run.optimizer, step, cfg)
            if step % cfg.eval_interval == 0:
                _evaluate(run, state, step)
            update = _update(run, step)
            state.record_step(update.loss, update.tokens, update.seconds)
            run.report.advance(update, state.window)
            last = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last:
                _log_training(run, state, update, lr)
            if last:
                _evaluate(run, state, state.step)  # before the last checkpoint, which records it
            state.seconds = time.perf_counter() - started
            alone_and_signalled = run.info.world_size == 1 and run.guard.requested  # e.g. during logging
            if not last and (update.stop or alone_and_signalled):
                raise _preempted(run, state, trainer_state)
            run.checkpointer.save(state.step, trainer_state, last_step=last)


def _evaluate(run: _Run, state: TrainState, step: int) -> None:
    """Score the held-out data with the recipe's precision and no dropout; record and report it."""
    if run.evaluate is None:
        return
    run.net.eval()  # the callback need not remember to do this
    try:
        with torch.no_grad(), run.settings.autocast():
            results = {k: float(v) for k, v in run.evaluate(run.net).items()}
    finally:
        run.net.train()
    state.record_eval(step, results)
    run.report.metrics(results, step=step)
    run.report.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))


def _micro_steps(run: _Run, step: int) -> tuple[float, int]:
    """Forward/backward over one step's micro-batches; returns (this rank's share of the mean
    token loss, this rank's input tokens).

    Each micro-loss is divided by the step's total scored-token count — over all ranks — so 2
    micro-batches of B/2, or 2 ranks of B/2, give the same gradient as one batch of B, even when
    fine-tuning masks a different number of targets in each. DDP/FSDP average gradients over
    ranks, so each rank's loss is scaled by the world size to turn that mean into the sum.
    """
    accum, world, device = run.cfg.grad_accum, run.info.world_size, run.device
    pairs = [run.batches.get(step, micro) for micro in range(accum)]
    scored = sum(int((y != IGNORE).sum()) for _, y in pairs)
    if world > 1:
        scored = int(distributed.all_reduce_sum([scored], device)[0])
    loss_total = torch.zeros((), device=device)
    tokens = 0
    for micro, (x, y) in enumerate(pairs):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with distributed.set_gradient_sync(run.net, micro == accum - 1):
            with run.settings.autocast():
                loss = token_loss_sum(run.net, x, y) / max(scored, 1)
            run.scaler.scale(loss * world if world > 1 else loss).backward()
        loss_total += loss.detach()
        tokens += x.numel()
    return float(loss_total), tokens  # float(): one host sync per step, needed for the NaN check


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


def _update(run: _Run, step: int) -> Update:
    """One optimizer step: micro-steps, the global loss (and stop flag), finiteness checks, clip, step."""
    started = time.perf_counter()
    loss, tokens = _micro_steps(run, step)
    stop, world = run.guard.requested, run.info.world_size
    if world > 1:  # one collective: the global mean loss, and whether any rank was asked to stop
        loss, stops = distributed.all_reduce_sum([loss, float(stop)], run.device)
        stop, tokens = stops > 0, tokens * world
    if not math.isfinite(loss):
        raise _not_finite(run, step, "the training loss", loss)
    run.scaler.unscale_(run.optimizer)
    grad_norm = _grad_norm(run.params, run.cfg.grad_clip)
    if not math.isfinite(grad_norm) and not run.scaler.is_enabled():  # the fp16 scaler skips such steps itself
        raise _not_finite(run, step, "the gradient norm", grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return Update(loss, tokens, grad_norm, time.perf_counter() - started, stop)


def _log_training(run: _Run, state: TrainState, update: Update, lr: float) -> None:
    """A point of the training curve: averages since the last point, then a fresh window."""
    window, hw = state.window, run.hardware
    point = {
        "step": state.step,
        "train_loss": window.mean_loss,
        "lr": lr,
        "grad_norm": update.grad_norm,
        "tokens_per_s": window.tokens_per_s,
        "tokens": state.tokens,
        "mfu": perf.mfu(window.tokens_per_s, hw.flops_per_token, hw.peak_flops, run.info.world_size),
        "peak_memory_mb": perf.peak_memory_mb(run.device),
    }
    state.curve.append(point)
    run.report.metrics({k: v for k, v in point.items() if k != "step"}, step=state.step)
    state.window = LogWindow()


def _trainer_state(run: _Run, state: TrainState) -> dict[str, Any]:
    """What a checkpoint carries besides weights, optimizer and RNGs: trainer.json (built only when one is written)."""
    step = state.step
    return {
        **state.to_json(),
        # Batches are a function of the step, so the step is the data cursor; stateful batch
        # sources may add their own state through state_dict()/load_state_dict().
        "data": run.batches.state_dict() if hasattr(run.batches, "state_dict") else {"cursor": "step", "step": step},
        "schedule": {"kind": "warmup-cosine", "next_lr": lr_at(step, run.cfg), "max_steps": run.cfg.max_steps},
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
    }


def _resume(run: _Run) -> tuple[TrainState, int | None]:
    """(the state of the newest checkpoint, its step), its weights, optimizer and RNGs loaded; or a fresh start."""
    resumed = run.checkpointer.resume_latest()
    if resumed is None:
        return TrainState(), None
    state = TrainState.from_json(resumed.state)
    if resumed.state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(resumed.state["scaler"])
    if resumed.state.get("data") is not None and hasattr(run.batches, "load_state_dict"):
        run.batches.load_state_dict(resumed.state["data"])
    if state.step > run.cfg.max_steps:
        raise TrainingError(
            f"{resumed.path}: checkpoint is at step {state.step}, beyond max_steps={run.cfg.max_steps}; "
            "raise max_steps or use an empty checkpoint directory"
        )
    run.report.announce(f"{run.report.name}: resuming from step {state.step}, checkpoint {resumed.path}")
    return state, state.step


def _preempted(run: _Run, state: TrainState, trainer_state: Callable[[], dict[str, Any]]) -> Preempted:
    written = run.checkpointer.save(state.step, trainer_state, force=True)
    where = (
        f"checkpoint {written} written; rerun the same command to resume"
        if written
        else "no checkpoint directory, so this run's progress is lost"
    )
    why = run.guard.reason or "a stop request on another rank"
    return Preempted(f"stopped by {why} after step {state.step} of {run.cfg.max_steps}: {where}")


def _not_finite(run: _Run, step: int, what: str, value: float) -> TrainingError:
    cfg, last = run.cfg, run.checkpointer.latest()
    kept = f"; the last good checkpoint {last[1]} is kept and a rerun resumes from it" if last else ""
    return TrainingError(
        f"step {step + 1}: {what} is {value} (not finite); lower lr (now {cfg.lr:g}), raise warmup_steps "
        f"(now {cfg.warmup_steps}) or set grad_clip, then rerun{kept}"
    )


# --- setting a run up -------------------------------------------------------------------------


def train(
    model: nn.Module,
    batches: Batches,
    cfg: TrainConfig,
    tracker: Tracker,
    checkpoint_dir: Path | None = None,
    evaluate: Evaluate | None = None,
    display: Display = Display(),  # frozen: one shared default is safe
    checkpoint_mirror: str | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps (resuming when possible).

    The model is moved to ``cfg.device``. When ``checkpoint_dir`` holds a checkpoint, training
    continues from its step with its weights, optimizer, RNG and data cursor, and says so in one
    line; the checkpointer writes one every ``checkpoint_interval`` steps, after the last one, and
    when SIGTERM, SIGINT or a preemption notice arrives (then ``Preempted`` is raised), keeping the
    newest ``keep_checkpoints``; ``checkpoint_mirror`` (an ``s3://`` prefix) keeps a copy of them
    for a run that resumes on another machine.
    ``evaluate`` runs at step 0, every ``eval_interval`` steps and at the end (before the last
    checkpoint, which records it); its ``val_loss`` becomes best/final.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: each trains on its own slice of
    the batches (``batch_size`` is per rank), gradients are averaged by DDP or FSDP2
    (``cfg.parallel``), and rank 0 alone logs and writes checkpoints.
    """
    perf.set_threads(cfg.threads)
    info, device = distributed.setup(resolve_device(cfg.device))
    settings = perf.runtime_settings(cfg, device)
    batches = for_rank(batches, info.rank, info.world_size)
    gpt = find_gpt(model)
    hardware = Hardware(
        float(gpt.flops_per_token()) if gpt is not None else 0.0,
        *perf.peak_flops(device, cfg.peak_flops, settings.amp_dtype),
    )
    report = _Report(tracker, display, info.is_main)
    model.to(device)
    model.train()
    with perf.backend_flags(settings), PreemptionGuard(watch_notice=info.local_rank == 0) as guard:
        net = distributed.parallelize(model, settings, info, cfg.parallel)
        optimizer = build_optimizer(net, cfg, fused=settings.fused_optimizer)
        run = _Run(
            net=net,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler(device.type, enabled=settings.grad_scaler),
            batches=batches,
            cfg=cfg,
            settings=settings,
            info=info,
            device=device,
            hardware=hardware,
            evaluate=evaluate,
            report=report,
            guard=guard,
            checkpointer=Checkpointer(
                checkpoint_dir,
                net,
                optimizer,
                interval=cfg.checkpoint_interval,
                keep=cfg.keep_checkpoints,
                info=info,
                device=device,
                mirror=CheckpointMirror(checkpoint_mirror) if checkpoint_mirror else None,
            ),
        )
        report.params(
            settings.describe()
            | {
                "perf.peak_flops": f"{hardware.peak_flops:.4g}",
                "perf.peak_source": hardware.peak_source,
                "perf.world_size": info.world_size,
                "perf.flops_per_token": hardware.flops_per_token,
            }
        )
        torch.manual_seed(cfg.seed)  # the dropout stream; the weights were drawn by the caller
        state, resumed_from = _resume(run)
        _loop(run, state)
    return _result(run, state, resumed_from)


def _result(run: _Run, state: TrainState, resumed_from: int | None) -> TrainResult:
    hw = run.hardware
    tokens_per_s = state.tokens / max(state.train_seconds, 1e-9)
    return TrainResult(
        steps=state.step,
        tokens=state.tokens,
        seconds=round(state.seconds, 3),
        tokens_per_s=tokens_per_s,
        initial_loss=float("nan") if state.initial_loss is None else state.initial_loss,
        final_train_loss=float("nan") if state.final_loss is None else state.final_loss,
        best_val_loss=state.best_val_loss,
        final_val_loss=state.final_val_loss,
        resumed_from=resumed_from,
        curve=state.curve,
        flops_per_token=hw.flops_per_token,
        total_flops=hw.flops_per_token * state.tokens,
        mfu=perf.mfu(tokens_per_s, hw.flops_per_token, hw.peak_flops, run.info.world_size),
        peak_flops=hw.peak_flops,
        peak_source=hw.peak_source,
        peak_memory_mb=round(perf.peak_memory_mb(run.device), 1),
        world_size=run.info.world_size,
        precision=run.settings.precision,
        compiled=run.settings.compile,
    )
