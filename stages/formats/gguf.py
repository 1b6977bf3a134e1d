"""``model.gguf``: the model and its tokenizer as one f32 GGUF file for llama.cpp and ollama
(``stages.formats.llama.gguf_writer``).

Gated through an independent reader, transformers' GGUF loader (``stages.formats.llama.gguf_gate``):
logits, greedy ids, tokenizer ids and decode, and the chat template must be gptpipe's. A tokenizer
GGUF cannot express fails before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.hf import transformers_row
from stages.formats.layout import GGUF_FILE

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def require(job: ExportJob) -> None:
    from stages.formats.llama.gguf_writer import check_tokenizer

    check_tokenizer(job.tokenizer)


def write(job: ExportJob) -> None:
    from stages.formats.llama import gguf_writer

    gguf_writer.write_gguf(job.model, job.tokenizer, job.out / GGUF_FILE)


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.llama.gguf_gate import check_gguf

    figures = check_gguf(job.model, job.tokenizer, job.out / GGUF_FILE, inputs)
    logged = {
        "export.gguf_max_abs_diff": figures["max_abs_diff"],
        "export.gguf_generation_matches": figures["generation_matches"],
        "export.gguf_tokenizer_matches": figures["tokenizer_matches"],
    }
    return GateResult(figures, [transformers_row(f"{GGUF_FILE} (transformers GGUF reader)", figures)], logged)


FORMAT = Format(
    name="gguf",
    files=(
        Output(
            GGUF_FILE,
            "the GGUF file llama.cpp runs (f32, with the tokenizer): embedding, then per layer RMS norm -> "
            "attention -> add -> RMS norm -> gate/up/down matmuls -> add (export.gguf; gated too)",
        ),
    ),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.gguf.enabled,
    require=require,
    artifact="gguf",
    viewer=(GGUF_FILE,),
)
