"""``genai-quantized/``: the weight-only quantized twin of ``genai/`` (MatMulNBits, block 32, at
export.quantized.precision), built from the same checkpoint.

Gated by quality, not bits (``stages.formats.genai.quality_gate``): held-out exact match and bits per
byte against fp32 PyTorch within export.quantized's two tolerances, and identical og.Tokenizer ids.
A twin that fails is no error: it is recorded in the certificate with its figures, its folder is
removed and it does not serve.
"""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.certificate import fraction
from stages.formats.format import Format, GateResult, Serving
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import GENAI_QUANTIZED_DIR

if TYPE_CHECKING:
    from stages.formats.job import ExportJob

log = logging.getLogger("gptpipe.export")


def write(job: ExportJob) -> None:
    from stages.formats.genai import package

    package.build_package(job.hf_dir(), job.out / GENAI_QUANTIZED_DIR, job.cfg.quantized.precision)


def quality_row(figures: dict) -> dict:
    """Its certificate row: the quality gate's figures in place of bit-parity."""
    tolerance = figures["tolerance"]
    return {
        "format": f"{GENAI_QUANTIZED_DIR}/ (onnxruntime-genai {figures['precision']})",
        "max_abs_diff": None,
        "greedy": None,
        "tokenizer": fraction(figures["tokenizer_matches"], figures["tokenizer_texts"]),
        "quality": (
            f"exact match {figures['exact_match']:.3f} vs fp32 {figures['exact_match_fp32']:.3f} "
            f"(allowed drop {tolerance['exact_match_drop']:g}); bits/byte {figures['bpb']:.4f} vs "
            f"{figures['bpb_fp32']:.4f} (allowed rise {tolerance['bpb_rise']:g}); "
            + ("passed" if figures["passed"] else f"rejected: {figures['reason']}")
        ),
    }


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.genai.gate import open_checked
    from stages.formats.genai.quality_gate import check_quantized

    runtime = open_checked(job.out / GENAI_QUANTIZED_DIR, inputs.threads)
    quality = check_quantized(job.model, job.tokenizer, runtime, inputs, job.cfg.quantized)
    figures = {**quality, "precision": job.cfg.quantized.precision, "folder": GENAI_QUANTIZED_DIR}
    if quality["passed"]:
        job.runtimes[GENAI_QUANTIZED_DIR] = runtime
    else:
        del runtime  # og.Model holds the folder's files open
        shutil.rmtree(job.out / GENAI_QUANTIZED_DIR)
        log.warning("export: %s quantized variant not kept: %s", figures["precision"], quality["reason"])
    logged = {
        "export.quantized_exact_match": quality["exact_match"],
        "export.quantized_exact_match_drop": quality["exact_match_drop"],
        "export.quantized_bpb_rise": quality["bpb_rise"],
        "export.quantized_passed": float(quality["passed"]),
    }
    return GateResult(figures, [quality_row(figures)], logged, kept=quality["passed"])


FORMAT = Format(
    name="quantized",
    files=(
        Output(
            GENAI_QUANTIZED_DIR,
            "its weight-only quantized twin (export.quantized; kept if its quality gate passes)",
        ),
    ),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.genai.enabled and cfg.quantized.enabled,
    serving=Serving(GENAI_QUANTIZED_DIR, lambda job: job.runtimes[GENAI_QUANTIZED_DIR].generate_ids),
    artifact=GENAI_QUANTIZED_DIR,
)
