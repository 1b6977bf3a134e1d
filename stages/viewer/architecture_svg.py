"""A static SVG of the architecture view, drawn from the ONNX graph's structure (no browser).

The picture is made from ``architecture.onnx`` itself — its top-level nodes in order, and the
body of the ``Block`` function beside them with what Attention and the MLP open into — so the
report shows what the exported graph holds, not a hand-drawn diagram that could go stale.
Each top-level box is ``<g class="node" data-op="Block" data-name="blocks.0">``: tests (and
people) can count the blocks in the SVG's text.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

import onnx

DOMAIN = "gptpipe"  # the local-function domain of stages.formats.onnx.architecture

_BOX_W, _BOX_H, _GAP = 230, 38, 14
_COLOURS = {
    "Block": "#c9def5",
    "Embedding": "#d8ecd0",
    "RotaryTables": "#f1e3c6",
    "RMSNorm": "#e4d7f0",
    "Linear": "#f5d0c9",
    "Attention": "#f9e79f",
    "SwiGLU": "#d5f5e3",
    "Add": "#eeeeee",
}


def _shape(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


def _box(x: int, y: int, op: str, name: str, detail: str = "") -> str:
    fill = _COLOURS.get(op, "#f4f4f4")
    lines = [
        f'<g class="node" data-op="{html.escape(op)}" data-name="{html.escape(name)}">',
        f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="{fill}" stroke="#555"/>',
        f'<text x="{x + 10}" y="{y + 16}" font-weight="bold">{html.escape(op)}</text>',
        f'<text x="{x + 10}" y="{y + 31}" fill="#444">{html.escape(name)}</text>',
    ]
    if detail:
        lines.append(
            f'<text x="{x + _BOX_W - 8}" y="{y + 24}" text-anchor="end" fill="#666" font-size="10">'
            f"{html.escape(detail)}</text>"
        )
    return "\n".join(lines) + "\n</g>"


def _arrow(x: int, y0: int, y1: int) -> str:
    return f'<line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#555" marker-end="url(#arrow)"/>'


def _column(x: int, y: int, items: list[tuple[str, str, str]]) -> tuple[list[str], int]:
    """Boxes top to bottom joined by arrows; returns the SVG parts and the y below the last box."""
    parts = []
    for i, (op, name, detail) in enumerate(items):
        if i:
            parts.append(_arrow(x + _BOX_W // 2, y - _GAP, y - 2))
        parts.append(_box(x, y, op, name, detail))
        y += _BOX_H + _GAP
    return parts, y


def _calls(function: onnx.FunctionProto | None) -> str:
    """What a function opens into, as the names of its non-constant nodes."""
    if function is None:
        return ""
    return " · ".join(node.name for node in function.node if node.op_type != "Constant")


def render_svg(proto: onnx.ModelProto) -> str:
    """The SVG text: the graph's top level on the left, one Block's body on the right."""
    graph = proto.graph
    functions = {f.name: f for f in proto.functions if f.domain == DOMAIN}
    inputs = [(value.name, _shape(value)) for value in graph.input]
    top = [("input", name, shape) for name, shape in inputs]
    top += [(node.op_type, node.name, "") for node in graph.node]
    top += [("output", value.name, _shape(value)) for value in graph.output]
    blocks = sum(1 for node in graph.node if node.domain == DOMAIN and node.op_type == "Block")
    left, left_end = _column(20, 50, top)
    body = functions.get("Block")
    inner = [(node.op_type, node.name, "") for node in body.node] if body is not None else []
    right, right_end = _column(330, 50, inner)
    notes = []
    y = right_end + 6
    for op in ("Attention", "SwiGLU"):
        text = _calls(functions.get(op))
        if text:
            notes.append(f'<text x="330" y="{y}" fill="#333" font-size="11" font-weight="bold">{op} opens into:</text>')
            for line in textwrap.wrap(text, 70):
                y += 15
                notes.append(f'<text x="340" y="{y}" fill="#333" font-size="11">{html.escape(line)}</text>')
            y += 20
    width, height = 330 + _BOX_W + 200, max(left_end, y) + 20
    title = f"{graph.name}: {blocks} Block nodes (one per layer)"
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            'font-family="sans-serif" font-size="12">',
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
            'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
            '<rect width="100%" height="100%" fill="white"/>',
            f'<text x="20" y="26" font-size="15" font-weight="bold">{html.escape(title)}</text>',
            '<text x="330" y="44" fill="#333">inside each Block (the function gptpipe.Block):</text>',
            *left,
            *right,
            *notes,
            "</svg>\n",
        ]
    )


def write_svg(graph_path: Path, dest: Path) -> Path:
    """Render ``graph_path`` (its structure only; external weights are not read) to ``dest``."""
    proto = onnx.load(str(graph_path), load_external_data=False)
    dest.write_text(render_svg(proto), encoding="utf-8")
    return dest


if __name__ == "__main__":  # python -m stages.viewer.architecture_svg <export>/architecture.onnx out.svg
    import sys

    write_svg(Path(sys.argv[1]), Path(sys.argv[2]))
