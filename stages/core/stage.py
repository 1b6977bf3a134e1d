"""What a stage is: one declared value per stage module, collected by ``stages.registry``.

A stage module (``stages/pretrain.py``…) ends with ``STAGE = Stage(...)``: its name, the recipe
sections it reads, the upstream stages whose artifacts it reads, the files it writes, the
metrics the report card shows, and its ``run`` function. Everything else (the recipe's stage
list, the report's columns, which stages make a model, the file names readers open) derives
from these values.

``run(cfg, inputs, out, tracker)`` receives a ``Sections`` view holding exactly the declared
sections — the same values its content key hashes — so a stage cannot read a recipe value
its key does not cover: reading one is an ``AttributeError`` naming the missing declaration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Metrics = dict[str, Any]  # JSON values a stage reports; the manifest keeps them, the report shows the headline


class Sections:
    """The recipe sections one stage declared, read-only: ``cfg.pretrain``, ``cfg.corpus``…"""

    __slots__ = ("_stage", "_values")

    def __init__(self, stage: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        stage = object.__getattribute__(self, "_stage")
        raise AttributeError(
            f"stage {stage!r} reads recipe field {name!r} but declares only {', '.join(values) or 'none'}; "
            f"add {name!r} to its STAGE sections so its content key covers it"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a stage's sections are read-only (tried to set {name!r})")

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return f"Sections({self._stage!r}, {', '.join(self._values)})"

    def to_json(self) -> dict[str, Any]:
        """The sections as plain data: what a stage call carries and its key and MLflow params hold."""
        return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in self._values.items()}


@dataclass(frozen=True)
class Output:
    """A file or directory a stage writes at the top of its artifact. Readers import the name."""

    name: str
    about: str


RunFn = Callable[[Sections, dict[str, Path], Path, Any], Metrics]


@dataclass(frozen=True)
class Stage:
    """One stage, declared once, in its own module."""

    name: str
    summary: str
    sections: tuple[str, ...]  # recipe fields it reads; exactly these reach run() and enter its key
    inputs: tuple[str, ...]  # upstream stages whose artifacts it reads (the default choice)
    outputs: tuple[Output, ...]  # what it writes at the top of its artifact
    run: RunFn  # run(cfg: Sections, inputs: {stage: local dir}, out: fresh dir, tracker) -> metrics
    headline: tuple[str, ...] = ()  # metrics the report card shows; run() must report each of them
    headline_when_set: tuple[str, ...] = ()  # shown too, reported only when the recipe turns them on
    choose_inputs: Callable[[Sections], tuple[str, ...]] | None = None  # when its own sections choose
    check: Callable[[Sections], list[str]] | None = None  # recipe-only problems, found before anything runs
    makes_model: bool = False  # its artifact holds a loadable model (checkpoint.model_directory finds it)
    trains: bool = False  # a training loop: streams curves and system metrics
    torchrun: bool = False  # may run as several processes (non-zero ranks leave before publishing)
    keeps_work: bool = False  # run() also takes work=<URI>: state kept across attempts, beside the store
    # Inputs from an earlier model's lineage, present only when the flow provides them (a run that
    # continues from, or is compared with, the registry's champion): ``parent``, ``champion``… Like
    # any input, each one present enters the content key.
    lineage_inputs: tuple[str, ...] = ()

    @property
    def shown(self) -> tuple[str, ...]:
        """The report card's metrics for this stage, in order."""
        return (*self.headline, *self.headline_when_set)

    @property
    def module(self) -> str:
        """The module whose code (and what it imports) makes this stage's code version."""
        return self.run.__module__

    def inputs_for(self, sections: Sections) -> tuple[str, ...]:
        """The upstream stages it reads under these sections (every one required)."""
        return tuple(self.choose_inputs(sections)) if self.choose_inputs else self.inputs

    def present_inputs(self, sections: Sections, given: Mapping[str, Any]) -> tuple[str, ...]:
        """The inputs a call reads: the required ones, then each lineage input ``given`` holds."""
        return (*self.inputs_for(sections), *(name for name in self.lineage_inputs if name in given))

    def problems(self, sections: Sections) -> list[str]:
        """What is wrong with these sections for this stage, one line each (empty: runnable)."""
        problems = []
        own = sections._values.get(self.name)
        if not self.torchrun and own is not None:
            for field in ("nproc_per_node", "nnodes"):
                if getattr(own, field, 1) > 1:
                    problems.append(
                        f"{self.name}.{field} = {getattr(own, field)}: stage {self.name} cannot run as several "
                        "processes (only stages declared torchrun=True can); set it to 1"
                    )
        if self.check is not None:
            problems += self.check(sections)
        return problems
