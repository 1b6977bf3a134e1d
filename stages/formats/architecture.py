"""``architecture.onnx``: the logits model drawn as embedding -> Block x N -> norm -> lm_head (ONNX local
functions, ``stages.formats.onnx.architecture``), and ``architecture.svg``, a static picture of it.

Gated like ``model.onnx``: ``onnx.checker`` accepts it, it has one Block per layer, its logits match
PyTorch at the gate shapes and its cache-free greedy generations match token for token
(``stages.formats.onnx.gate.architecture_parity``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.certificate import OWN_TOKENIZER, fraction
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import ARCHITECTURE_GRAPH, SVG_FILE

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def write(job: ExportJob) -> None:
    from stages.formats.onnx.architecture import save_architecture
    from stages.viewer import architecture_svg

    job.graphs["architecture"] = save_architecture(job.model, job.out, job.cfg.onnx.opset, job.external)
    architecture_svg.write_svg(job.out / ARCHITECTURE_GRAPH, job.out / SVG_FILE)


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.onnx.gate import architecture_parity, check_graphs

    check_graphs(job.out, [ARCHITECTURE_GRAPH])
    figures = architecture_parity(job.model, job.tokenizer, job.out, inputs)
    row = {
        "format": ARCHITECTURE_GRAPH,
        "max_abs_diff": figures["max_abs_diff"],
        "greedy": fraction(figures["generation_matches"], figures["generation_prompts"]),
        "tokenizer": OWN_TOKENIZER,
    }
    return GateResult(figures, [row])


FORMAT = Format(
    name="architecture",
    files=(
        Output(
            ARCHITECTURE_GRAPH,
            "the architecture: embedding, Block x N (open a Block for attention and MLP), norm, lm_head",
        ),
        Output(SVG_FILE, "a static picture of the architecture for the report"),
    ),
    write=write,
    gate=gate,
    viewer=(ARCHITECTURE_GRAPH,),
)
