"""What a training run carries from step to step, and what it reports when it is done.

``TrainState`` is the loop's progress — and exactly what a checkpoint's ``trainer.json`` carries
to a resumed run, so a resumed run logs the same curve and totals as an uninterrupted one.
``TrainResult`` is what ``train`` returns; its ``summary()`` is what a stage manifest records.
``Update`` is one optimizer step's outcome, ``Hardware`` the ingredients of the MFU figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What one ``train`` call did. ``curve`` holds every logged point, for plots.

    The field names are the metric names: both training stages report these facts under them
    (``summary()``), so pretrain and finetune manifests, MLflow and the report card agree.
    """

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    initial_loss: float
    final_train_loss: float
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


@dataclass
class LogWindow:
    """Sums since the last logged point, so each point reports averages over its interval.

    Checkpointed too, so a resumed run logs the same averages as an uninterrupted one.
    """

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    @property
    def mean_loss(self) -> float:
        return self.loss / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class TrainState:
    """Progress of a run: completed steps, tokens, time, losses and the curve so far."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # wall time of the run, over every attempt
    train_seconds: float = 0.0  # inside optimizer steps only: the tokens/s denominator
    initial_loss: float | None = None
    final_loss: float | None = None  # the last step's training loss (trainer.json's name for final_train_loss)
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    window: LogWindow = field(default_factory=LogWindow)

    def to_json(self) -> dict[str, Any]:
        """trainer.json's fields (the window as [loss, steps, tokens, seconds], as always written)."""
        data = asdict(self)
        data["window"] = [self.window.loss, self.window.steps, self.window.tokens, self.window.seconds]
        return data

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainState:
        known = {name: saved[name] for name in cls.__dataclass_fields__ if name in saved and name != "window"}
        return cls(**known, window=LogWindow(*saved.get("window", [])))

    def record_step(self, loss: float, tokens: int, seconds: float) -> None:
        self.step, self.tokens, self.train_seconds = self.step + 1, self.tokens + tokens, self.train_seconds + seconds
        self.initial_loss = loss if self.initial_loss is None else self.initial_loss
        self.final_loss = loss
        self.window.add(loss, tokens, seconds)

    def record_eval(self, step: int, results: dict[str, float]) -> None:
        if "val_loss" in results:
            self.final_val_loss = results["val_loss"]
            if self.best_val_loss is None or self.final_val_loss < self.best_val_loss:
                self.best_val_loss = self.final_val_loss
        self.curve.append({"step": step, **results})


@dataclass(frozen=True)
class Update:
    """One optimizer step's outcome, over all ranks."""

    loss: float  # mean loss per scored token
    tokens: int  # input tokens
    grad_norm: float
    seconds: float
    stop: bool  # some rank was asked to stop (SIGTERM, SIGINT, a preemption notice) during the step


@dataclass(frozen=True)
class Hardware:
    """The MFU figures' ingredients: model FLOPs per token and the peak of one device (and its source)."""

    flops_per_token: float
    peak_flops: float
    peak_source: str
