"""The export formats, in the order the export writes, gates and certifies them.

Adding a format: write ``stages/formats/<name>.py`` ending with ``FORMAT = Format(...)``
(``stages.formats.format``), give it a section in ``ExportConfig`` when the recipe may turn it off,
and add it here. The export stage, its outputs, publish's captions, the certificate and the recipe
reference read it from this tuple. The declarations are torch-free: importing this is cheap.
"""

from __future__ import annotations

from stages.formats import architecture, genai_fp32, genai_quantized, gguf, hf, int8, onnx_graphs, pt2
from stages.formats.format import Format

FORMATS: tuple[Format, ...] = (
    pt2.FORMAT,  # first: it saves the traced program before model.onnx is exported from it
    onnx_graphs.FORMAT,
    architecture.FORMAT,
    int8.FORMAT,
    hf.FORMAT,
    gguf.FORMAT,
    genai_fp32.FORMAT,
    genai_quantized.FORMAT,
)


def descriptions(formats: tuple[Format, ...] = FORMATS) -> dict[str, str]:
    """Every format's file -> its one description, in registry order."""
    return {name: about for f in formats for name, about in f.describe().items()}
