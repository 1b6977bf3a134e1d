"""The seven stages, in pipeline order: the one list of their names, and their declarations.

Each stage module declares itself (``STAGE = Stage(...)`` in ``stages/<name>.py``); this module
names them in order and collects those values. Every other list of stages — the recipe's
``stages:`` choices, the report card's columns, which stages make a model, stream training
curves or may run under ``torchrun`` — derives from here.

The stage modules are imported on first use, not when this module is: the recipe schema
imports this module for the names, and a stage module imports torch.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Literal

from stages.core.errors import ArtifactError

if TYPE_CHECKING:
    from stages.core.stage import Stage

ORDER: tuple[str, ...] = ("tokenizer", "data", "pretrain", "finetune", "evaluate", "export", "publish")
StageName = Literal[ORDER]  # type: ignore[valid-type]  # the recipe's allowed stage names


@functools.cache
def stage(name: str) -> Stage:
    """The declaration of stage ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in ORDER:
        raise ArtifactError(f"unknown stage {name!r}; known stages: {', '.join(ORDER)}")
    declared = importlib.import_module(f"stages.{name}").STAGE
    if declared.name != name:
        raise ArtifactError(f"stages/{name}.py declares STAGE named {declared.name!r}; it must be {name!r}")
    return declared


def stages() -> tuple[Stage, ...]:
    """Every stage's declaration, in pipeline order."""
    return tuple(stage(name) for name in ORDER)


def model_stages() -> tuple[str, ...]:
    """Stages whose artifact holds a loadable model (what export, generate and eval can start from)."""
    return tuple(s.name for s in stages() if s.makes_model)
