"""The int8 copy of ``model.onnx`` and what it costs: held-out loss, fp32 graph against int8 graph.

Dynamic quantization (weights int8, activations quantised per batch) is measured, not gated: a
loss change is a trade-off for whoever serves the model, not a sign the export is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.formats import layout
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import INT8_FILE
from stages.formats.onnx import runtime as ortgen
from stages.lm.chat import IGNORE, ChatTemplate
from stages.lm.tokenizer import Tokenizer


def quantize_int8(out: Path, external: bool) -> str:
    """Dynamic int8 (weights int8, activations quantised per batch) of the logits graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs every node it skips on the root logger: thousands of lines at INFO.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            out / layout.LOGITS_GRAPH, out / INT8_FILE, weight_type=QuantType.QInt8, use_external_data_format=external
        )
    finally:
        logging.disable(logging.NOTSET)
    return INT8_FILE


def _masked_loss(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy over targets that are not IGNORE, and how many there were."""
    keep = targets != IGNORE
    rows = logits[keep].astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(rows)), targets[keep]].sum()), int(keep.sum())


def heldout_loss_change(out: Path, tokenizer: Tokenizer, inputs: GateInputs, items: int) -> dict:
    """Assistant-token loss on the first ``items`` (export.heldout_items) held-out chat items: fp32 graph vs
    its int8 twin."""
    template = ChatTemplate(tokenizer)
    meta = ortgen.ExportMeta.read(out)
    sessions = {
        name: ortgen.open_session(out / file, inputs.threads)
        for name, file in (("fp32", layout.LOGITS_GRAPH), ("int8", INT8_FILE))
    }
    totals = {name: 0.0 for name in sessions}
    count = 0
    for messages in inputs.conversations[:items]:
        inputs, targets = template.render(messages).inputs_targets()
        ids = np.array([inputs[-meta.block_size :]], dtype=np.int64)
        wanted = np.array([targets[-meta.block_size :]], dtype=np.int64)
        for name, session in sessions.items():
            loss, n = _masked_loss(session.run(None, {"input_ids": ids})[0], wanted)
            totals[name] += loss
        count += n
    fp32, int8 = totals["fp32"] / max(count, 1), totals["int8"] / max(count, 1)
    return {
        "loss_fp32": round(fp32, 5),
        "loss_int8": round(int8, 5),
        "loss_delta": round(int8 - fp32, 5),
        "tokens": count,
    }
