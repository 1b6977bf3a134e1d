"""``genai/``: an onnxruntime-genai model folder (fp32, CPU), built by its model builder from ``hf/``
(a scratch checkpoint when export.hf is off; ``stages.formats.genai.package``).

Gated with og.Model like the other formats (``stages.formats.genai.gate``): logits after each gate
prompt, greedy ids, og.Tokenizer's ids and decode. The runtime the gate opens is the one the serving
timing measures: an onnxruntime-genai folder is opened once per export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.certificate import fraction
from stages.formats.format import Format, GateResult, Serving
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import GENAI_DIR

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def require(job: ExportJob) -> None:
    from stages.formats.genai.package import require_genai

    require_genai()  # a missing runtime fails before the graphs, naming export.genai.enabled=false


def write(job: ExportJob) -> None:
    from stages.formats.genai import package

    package.build_package(job.hf_dir(), job.out / GENAI_DIR)


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.genai.gate import check_package, open_checked

    runtime = job.runtimes[GENAI_DIR] = open_checked(job.out / GENAI_DIR, inputs.threads)
    figures = check_package(job.model, job.tokenizer, runtime, job.hf_dir(), inputs)
    row = {
        "format": f"{GENAI_DIR}/ (onnxruntime-genai)",
        "max_abs_diff": figures["max_abs_diff"],
        "greedy": fraction(figures["generation_matches"], figures["generation_prompts"]),
        "tokenizer": fraction(figures["tokenizer_matches"], figures["tokenizer_texts"]),
    }
    logged = {
        "export.genai_max_abs_diff": figures["max_abs_diff"],
        "export.genai_generation_matches": figures["generation_matches"],
        "export.genai_tokenizer_matches": figures["tokenizer_matches"],
    }
    return GateResult(figures, [row], logged)


FORMAT = Format(
    name="genai",
    files=(Output(GENAI_DIR, "an onnxruntime-genai model folder built from hf/ (export.genai; gated too)"),),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.genai.enabled,
    require=require,
    serving=Serving(GENAI_DIR, lambda job: job.runtimes[GENAI_DIR].generate_ids),
    artifact=GENAI_DIR,
)
