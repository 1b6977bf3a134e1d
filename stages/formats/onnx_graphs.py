"""The ONNX graphs: ``model.onnx`` (logits) and ``model_kv.onnx`` (the KV-cache step ONNX Runtime serves).

Written from the traced logits program (``stages.formats.onnx.exporter``), with ``export.json``
describing them. The gate (``stages.formats.onnx.gate``): ``onnx.checker`` accepts both, their logits
and presents match PyTorch within ``export.tolerance`` at every gate shape, and greedy ORT+KV
generation gives PyTorch's token ids for every prompt. Its figures are the export's headline metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.certificate import OWN_TOKENIZER, fraction
from stages.formats.format import Format, GateResult, Serving
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import KV_GRAPH, LOGITS_GRAPH

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def write(job: ExportJob) -> None:
    import torch

    from stages.formats.onnx import exporter

    program = job.once("program", lambda: exporter.trace_logits(job.model))
    with torch.no_grad(), exporter.quiet_exporter():
        job.graphs.update(exporter.export_graphs(job.model, job.out, job.cfg.onnx.opset, job.external, program))
    exporter.write_meta(job.model, job.out, job.graphs, job.cfg, job.external)  # what the runtime reads


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.onnx.gate import check_graphs, check_parity
    from stages.formats.onnx.runtime import OnnxGenerator

    check_graphs(job.out, [LOGITS_GRAPH, KV_GRAPH])
    kv = job.runtimes[KV_GRAPH] = OnnxGenerator(job.out, threads=inputs.threads)
    figures = check_parity(job.model, job.tokenizer, kv, inputs)
    by_shape = figures["max_abs_diff_by_shape"].values()
    rows = [
        {
            "format": LOGITS_GRAPH,
            "max_abs_diff": max((v["logits"] for v in by_shape), default=None),
            "greedy": "— (logits only)",
            "tokenizer": OWN_TOKENIZER,
        },
        {
            "format": KV_GRAPH,
            "max_abs_diff": max((v["kv"] for v in by_shape), default=None),
            "greedy": fraction(figures["generation_matches"], figures["generation_prompts"]),
            "tokenizer": OWN_TOKENIZER,
        },
    ]
    logged = {
        "export.max_abs_diff": figures["max_abs_diff"],
        "export.generation_matches": figures["generation_matches"],
    }
    return GateResult(figures, rows, logged)


FORMAT = Format(
    name="onnx",
    files=(
        Output(LOGITS_GRAPH, "logits for input ids (dynamic batch and sequence)"),
        Output(KV_GRAPH, "KV-cache step: input ids + past keys/values -> logits + present keys/values"),
    ),
    write=write,
    gate=gate,
    serving=Serving(KV_GRAPH, lambda job: job.runtimes[KV_GRAPH].generate_ids),
    viewer=(LOGITS_GRAPH, KV_GRAPH),
    figures_at_top=True,
)
