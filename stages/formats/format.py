"""What an export format is: one ``Format`` value, declared at the end of its own module.

A format names the files it writes (each with its one description: the export stage's outputs,
publish's viewer captions and the docs read it), its writer, its gate, its certificate rows and,
when it can answer chat requests, its serving runtime. ``stages.export`` runs every enabled
format the same way: write, gate, log, certificate rows (``stages.formats.registry`` lists them).

The gate takes the export's one ``GateInputs`` (built once per export: ids, prompts, held-out
conversations, tolerance, threads) and returns one ``GateResult``; the certificate is the rows of
those results. A gate that finds the format wrong raises ``ParityError`` (nothing is published); a
quality gate may instead return ``kept=False`` (the format is recorded and dropped).

Torch-free, like the declarations: the recipe check imports every stage module, and the export
stage reads its outputs from here. Writers and gates import what they need when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.core.stage import Output

if TYPE_CHECKING:
    from stages.core.sections import ExportConfig
    from stages.formats.gate_inputs import GateInputs
    from stages.formats.job import ExportJob

Row = dict[str, Any]  # one certificate row: format, max_abs_diff, greedy, tokenizer (and quality)


@dataclass(frozen=True)
class GateResult:
    """What one format's gate found."""

    figures: dict[str, Any]  # the export's metrics under the format's name (top level for the graphs)
    rows: list[Row] = field(default_factory=list)  # its certificate rows (decode ms and served added later)
    logged: dict[str, float] = field(default_factory=dict)  # the headline numbers logged to MLflow
    kept: bool = True  # False: a quality gate rejected it; its files are gone and it does not serve


@dataclass(frozen=True)
class Serving:
    """How a format answers chat requests: ``runtime`` is what export.json's ``serve`` holds (a file or
    folder name); ``open`` gives its generator's ``generate_ids`` for the export's timing."""

    runtime: str
    open: Callable[[ExportJob], Any]


@dataclass(frozen=True)
class Format:
    """One export format, declared once in ``stages/formats/<module>.py``."""

    name: str  # its recipe section (export.<name>) and its key in the export's metrics
    files: tuple[Output, ...]  # what it writes at the top of the export, each with its one description
    write: Callable[[ExportJob], None]  # writes the files into job.out
    gate: Callable[[ExportJob, GateInputs], GateResult]  # raises ParityError when the files are wrong
    enabled: Callable[[ExportConfig], bool] = lambda cfg: True  # whether the recipe asks for it
    require: Callable[[ExportJob], None] | None = None  # checked before anything is written (fails fast)
    serving: Serving | None = None  # set when the format can answer chat requests
    artifact: str | None = None  # MLflow artifact path its first file is logged under, when it is logged
    viewer: tuple[str, ...] = ()  # files publish shows in the Netron bundle by default
    figures_at_top: bool = False  # its figures are the export's headline metrics (the ONNX graphs)

    def describe(self) -> dict[str, str]:
        """File name -> description: what export's outputs, publish and the docs read."""
        return {output.name: output.about for output in self.files}
