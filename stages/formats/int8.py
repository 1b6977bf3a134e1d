"""``model.int8.onnx``: a dynamic int8 copy of ``model.onnx`` (weights int8, activations quantized per
batch), measured and not gated: its held-out loss change against the fp32 graph is a trade-off for
whoever serves it, not a sign the export is wrong (``stages.formats.onnx.int8``). Not the gated
onnxruntime-genai twin (``stages.formats.genai_quantized``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import INT8_FILE, LOGITS_GRAPH

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def write(job: ExportJob) -> None:
    from stages.formats.onnx.int8 import quantize_int8

    job.graphs["int8"] = quantize_int8(job.out, job.external)


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    """Not a pass/fail gate: the loss change on export.heldout_items held-out items, recorded."""
    from stages.formats.onnx.int8 import heldout_loss_change

    change = heldout_loss_change(job.out, job.tokenizer, inputs, job.cfg.heldout_items)
    return GateResult({**change, "heldout": inputs.heldout_source})


FORMAT = Format(
    name="int8",
    files=(Output(INT8_FILE, f"dynamic int8 copy of {LOGITS_GRAPH} (export.int8; measured, not gated)"),),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.int8.enabled,
    viewer=(INT8_FILE,),
)
