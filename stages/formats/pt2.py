"""``model.pt2``: the logits model as a torch.export program, for PyTorch users who want no ONNX.

It is the program ``model.onnx`` was exported from (traced once per export); the gate loads it back
and its logits must match the model's within ``export.tolerance`` on one more shape than the ONNX gate
checks (``stages.formats.onnx.gate.check_pt2``). Its figure is ``pt2_max_abs_diff``; no certificate row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import PT2_FILE

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def write(job: ExportJob) -> None:
    import torch

    from stages.formats.onnx.exporter import trace_logits

    torch.export.save(job.once("program", lambda: trace_logits(job.model)), str(job.out / PT2_FILE))
    job.graphs["pt2"] = PT2_FILE


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.onnx.gate import check_pt2

    return GateResult(check_pt2(job.model, job.out, inputs))


FORMAT = Format(
    name="pt2",
    files=(Output(PT2_FILE, "torch.export program of the logits model"),),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.pt2.enabled,
    viewer=(PT2_FILE,),
    figures_at_top=True,
)
