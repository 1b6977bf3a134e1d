"""The GPT written as ONNX graphs (and a torch.export program), with the ``export.json`` that describes them.

``trace_logits`` traces the logits model once (``model.pt2`` saves that program, ``stages.formats.pt2``);
``export_graphs`` writes ``model.onnx`` from it (logits for input ids; batch and sequence axes dynamic)
and ``model_kv.onnx`` (input ids + past keys/values -> logits + present keys/values); ``write_meta`` records shapes, tensor names and files for ``stages.formats.onnx.runtime``.

One KV graph serves prefill and decode: a zero-length past is a valid ONNX Runtime input,
and the model's explicit-mask path equals the causal one when the past is empty. The graph is
traced with a non-empty example past so torch.export does not specialise that axis to 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from stages.core.sections import ExportConfig
from stages.formats import layout
from stages.formats.onnx import runtime as ortgen
from stages.lm.model import GPT

PROTOBUF_LIMIT = 2 * 1024**3  # one ONNX protobuf cannot exceed 2 GB: weights go to a side file


class KVGraph(nn.Module):
    """``forward_with_cache`` with the cache flattened into positional tensors (ONNX has no lists)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.model.forward_with_cache(input_ids, past)
        return (logits, *(t for layer in presents for t in layer))


def weight_bytes(model: nn.Module) -> int:
    # parameters() yields a tied tensor once, as the graph stores it once.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _dims(block_size: int) -> tuple[torch.export.Dim, torch.export.Dim, torch.export.Dim]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=block_size)
    past = torch.export.Dim("past", min=0, max=block_size)
    return batch, seq, past


def _example_ids(model: GPT) -> torch.Tensor:
    # Example inputs of size >= 2 on every dynamic axis: torch.export specialises sizes 0 and 1.
    return torch.arange(10).reshape(2, 5) % model.cfg.vocab_size


def trace_logits(model: GPT) -> torch.export.ExportedProgram:
    """The logits model as a torch.export program (batch and sequence dynamic): model.onnx is exported
    from it, and model.pt2 is it saved."""
    batch, seq, _ = _dims(model.cfg.block_size)
    return torch.export.export(model, (_example_ids(model),), dynamic_shapes={"idx": {0: batch, 1: seq}}, strict=False)


def export_graphs(
    model: GPT, out: Path, opset: int, external: bool, program: torch.export.ExportedProgram
) -> dict[str, str]:
    """Write model.onnx (from ``program``, ``trace_logits``'s) and model_kv.onnx; return {role: file name}."""
    cfg = model.cfg
    batch, seq, past_dim = _dims(cfg.block_size)
    ids = _example_ids(model)
    graphs = {"logits": layout.LOGITS_GRAPH, "kv": layout.KV_GRAPH}
    onnx_program = torch.onnx.export(
        program,
        (ids,),
        dynamo=True,
        opset_version=opset,
        input_names=["input_ids"],
        output_names=["logits"],
        verbose=False,
    )
    # Exporting a traced program keeps torch's symbol names (s27...): name the axes for Netron.
    axes = onnx_program.model.graph.inputs[0].shape
    onnx_program.rename_axes({axes[0]: "batch", axes[1]: "seq"})
    onnx_program.save(str(out / layout.LOGITS_GRAPH), external_data=external)  # external: <name>.data beside it

    kv_in, kv_out = ortgen.kv_names(cfg.n_layer)
    past = [torch.zeros(2, cfg.n_head, 3, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    shapes = {"input_ids": {0: batch, 1: seq}, "past_flat": tuple({0: batch, 2: past_dim} for _ in past)}
    onnx_program = torch.onnx.export(
        KVGraph(model).eval(),
        (ids, *past),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=shapes,
        input_names=kv_in,
        output_names=kv_out,
        verbose=False,
    )
    onnx_program.save(str(out / layout.KV_GRAPH), external_data=external)
    return graphs


@contextlib.contextmanager
def quiet_exporter():
    """The ONNX exporter's optimiser logs each merged constant at INFO; keep the stage log readable."""
    # (and warns that torchvision ops are unavailable, which a GPT never uses).
    noisy = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
            yield
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


def write_meta(
    model: GPT, out: Path, graphs: dict[str, str], cfg: ExportConfig, external: bool, serve: str = ""
) -> None:
    """``export.json``: what ``stages.formats.onnx.runtime.ExportMeta`` reads to run the graphs without torch
    (``serve``: the runtime ``stages.formats.served`` opens; empty = the KV graph)."""
    kv_in, kv_out = ortgen.kv_names(model.cfg.n_layer)
    shape = model.cfg
    meta = {
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "head_dim": shape.head_dim,
        "block_size": shape.block_size,
        "vocab_size": shape.vocab_size,
        "model": shape.to_dict(),
        "graphs": graphs,
        "logits_input": "input_ids",
        "kv_inputs": kv_in,
        "kv_outputs": kv_out,
        "source": cfg.source,
        "opset": cfg.onnx.opset,
        "external_data": external,
        "tokenizer": layout.TOKENIZER_DIR,
        "serve": serve,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ortgen.ort.__version__},
    }
    (out / layout.META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
