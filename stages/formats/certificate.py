"""The export's equivalence certificate: one table, one row per format, built from the gates' results
(each format's declaration says what its rows hold, ``stages.formats.format.GateResult.rows``).

Columns: max |Δlogits| against PyTorch (scaled as ``stages.formats.parity`` scales it), greedy
generations identical n/n, tokenizer ids identical n/n on the held-out texts, and decode ms/token
on the machine that exported (``stages.formats.decode_timing``; only the runtimes that can serve are
timed). A quantized row carries its quality gate's figures instead of bit-parity: exact match and
bits per byte against fp32 PyTorch, with the tolerance it was held to. The same rows go into the
export's metrics (so its manifest and the MLflow run), the report card and the registry version's tags.
"""

from __future__ import annotations

from typing import Any

from stages.formats.format import GateResult, Row

# Formats that tokenize with gptpipe's own SentencePiece model (copied into the export): nothing to compare.
OWN_TOKENIZER = "gptpipe's own"


def fraction(matches: Any, total: Any) -> str:
    """A certificate cell such as ``4/4`` (``—`` when not measured)."""
    return "—" if matches is None or total is None else f"{matches}/{total}"


def row_key(row: Row) -> str:
    """A row's runtime name: what ``decode_ms`` and export.json's ``serve`` call it (``genai``, ``model_kv.onnx``)."""
    return row["format"].split(" ")[0].rstrip("/")


def certificate_rows(results: list[GateResult], decode_ms: dict[str, float], served: str, prompts: int) -> list[Row]:
    """The certificate: PyTorch's reference row, then every gate result's rows in registry order, each with
    its decode ms/token where it was timed, and the served runtime marked."""
    reference: Row = {
        "format": "PyTorch (reference)",
        "max_abs_diff": 0.0,
        "greedy": fraction(prompts, prompts),
        "tokenizer": OWN_TOKENIZER,
    }
    rows = [reference] + [dict(row) for result in results for row in result.rows]
    for row in rows:
        timed = decode_ms.get("pytorch" if row is reference else row_key(row))
        row["decode_ms"] = None if timed is None else round(float(timed), 3)
    for row in rows:
        row["served"] = row_key(row) == served
    return rows


def _cell(value: Any, digits: str = ".2e") -> str:
    if value is None:
        return "—"
    return format(value, digits) if isinstance(value, float) else str(value)


def certificate_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the served runtime marked), quantized quality notes below it."""
    lines = [
        "| format | max abs Δlogits | greedy identical | tokenizer ids identical | decode ms/token |",
        "|---|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        name = f"**{row['format']}** (served)" if row.get("served") else row["format"]
        greedy = row["greedy"] if row["greedy"] is not None else "— (quality gate)"
        lines.append(
            f"| {name} | {_cell(row['max_abs_diff'])} | {greedy} | {row['tokenizer']} | {_cell(row['decode_ms'], '.3f')} |"
        )
        if row.get("quality"):
            notes.append(f"- {row['format']}: {row['quality']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def certificate_tags(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One registry tag per format (``gptpipe.certificate.<format>``), each row in one line."""
    tags = {}
    for row in rows:
        key = row_key(row)
        parts = [
            f"max_abs_diff={_cell(row['max_abs_diff'])}",
            f"greedy={row['greedy'] if row['greedy'] is not None else 'quality gate'}",
            f"tokenizer={row['tokenizer']}",
            f"decode_ms={_cell(row['decode_ms'], '.3f')}",
        ]
        if row.get("quality"):
            parts.append(row["quality"])
        if row.get("served"):
            parts.append("served")
        tags[f"gptpipe.certificate.{key}"] = "; ".join(parts)[:5000]
    return tags
