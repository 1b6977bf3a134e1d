"""The seven stages, declared once: name, module, recipe sections, inputs and outputs.

Every other list of stages (the recipe's ``stages:`` choices, the runner's modules, the report
card's columns, which stages stream training curves or may run under ``torchrun``, where a
stage writes a model) is derived from ``STAGES``. This module holds data only: it
imports no stage, so the recipe schema can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from stages.core.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    """What one stage reads and writes, for the runner, the flow and the report."""

    name: str
    summary: str
    sections: tuple[str, ...]  # recipe sections it reads; they, and only they, enter its key
    inputs: tuple[str, ...]  # upstream stages whose artifacts it reads (the default choice)
    choose_inputs: Callable[[PipelineConfig], tuple[str, ...]] | None = None  # when the recipe chooses
    headline: tuple[str, ...] = ()  # manifest metrics the report card shows
    makes_model: bool = False  # its artifact holds a loadable model (checkpoint.model_directory finds it)
    trains: bool = False  # a training loop: streams curves and system metrics
    torchrun: bool = False  # may run as several processes (non-zero ranks leave before publishing)

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def inputs_for(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return tuple(self.choose_inputs(cfg)) if self.choose_inputs else self.inputs


def _finetune_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    # Replay mixes pretraining text (the data stage's train split) into fine-tuning.
    return ("tokenizer", "pretrain", "data") if cfg.finetune.replay_fraction > 0 else ("tokenizer", "pretrain")


def _export_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    return ("tokenizer", cfg.export.source)


STAGES: tuple[Stage, ...] = (
    Stage(
        "tokenizer",
        "SentencePiece model trained on the corpus",
        ("corpus", "tokenizer"),
        (),
        headline=("vocab_size", "bytes_per_token"),
    ),
    Stage(
        "data",
        "corpus to memory-mapped token shards, train/val split",
        ("corpus", "data"),
        ("tokenizer",),
        headline=("train_tokens", "val_tokens"),
    ),
    Stage(
        "pretrain",
        "GPT from scratch on the shards",
        ("pretrain",),
        ("tokenizer", "data"),
        headline=("initial_loss", "final_val_loss", "tokens_per_s", "mfu"),
        makes_model=True,
        trains=True,
        torchrun=True,
    ),
    Stage(
        "finetune",
        "supervised fine-tuning on chat data (full or LoRA)",
        ("finetune",),
        ("tokenizer", "pretrain"),
        choose_inputs=_finetune_inputs,
        headline=("final_loss", "final_val_loss", "lora_merge_max_abs_dlogits", "tokens_per_s"),
        makes_model=True,
        trains=True,
    ),
    Stage(
        "evaluate",
        "loss, bits per byte and exact match, base vs fine-tuned",
        ("evaluate",),
        ("tokenizer", "data", "pretrain", "finetune"),
        headline=(
            "base_accuracy",
            "sft_accuracy",
            "sft_lm_eval_exact_match",
            "base_bits_per_byte",
            "sft_bits_per_byte",
            "sft_lm_eval_bpb",
            "base_seconds",
            "sft_seconds",
        ),
    ),
    Stage(
        "export",
        "ONNX graphs behind a parity gate against PyTorch",
        ("export",),
        ("tokenizer", "finetune"),
        choose_inputs=_export_inputs,
        headline=("max_abs_diff", "generation_matches"),
    ),
    Stage(
        "publish", "Netron viewer bundle and graphs", ("publish",), ("export",), headline=("graphs", "netron_version")
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
STAGE_ORDER: tuple[str, ...] = tuple(BY_NAME)
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]  # the recipe's allowed stage names


def stage(name: str) -> Stage:
    """The declaration of stage ``name``; an unknown name is a one-line error listing the known ones."""
    from stages.core.errors import ArtifactError

    if name not in BY_NAME:
        raise ArtifactError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_ORDER)}")
    return BY_NAME[name]
