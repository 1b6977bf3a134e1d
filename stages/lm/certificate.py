"""The export's equivalence certificate: one table, one row per format, built from the gates' figures.

Columns: max |Δlogits| against PyTorch (scaled as ``stages.lm.parity`` scales it), greedy
generations identical n/n, tokenizer ids identical n/n on the held-out texts, and decode ms/token
on the machine that exported (``stages.lm.decode_timing``; only the runtimes that can serve are
timed). A quantized row carries its quality gate's figures instead of bit-parity: exact match and
bits per byte against fp32 PyTorch, with the tolerance it was held to. The same rows go into the
export's metrics (so its manifest and the MLflow run), the report card and the registry version's tags.
"""

from __future__ import annotations

from typing import Any

from stages.lm import export_layout as layout

# Formats that tokenize with gptpipe's own SentencePiece model (copied into the export): nothing to compare.
OWN_TOKENIZER = "gptpipe's own"


def _fraction(matches: Any, total: Any) -> str:
    return "—" if matches is None or total is None else f"{matches}/{total}"


def _ms(timings: dict[str, float], key: str) -> float | None:
    value = timings.get(key)
    return None if value is None else round(float(value), 3)


def certificate_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The certificate's rows from the export stage's metrics (formats the recipe turned off are absent)."""
    timings: dict[str, float] = metrics.get("decode_ms", {})
    by_shape = metrics.get("max_abs_diff_by_shape", {})
    prompts = metrics.get("generation_prompts")
    rows = [
        {
            "format": "PyTorch (reference)",
            "max_abs_diff": 0.0,
            "greedy": _fraction(prompts, prompts),
            "tokenizer": OWN_TOKENIZER,
            "decode_ms": _ms(timings, "pytorch"),
        },
        {
            "format": layout.LOGITS_GRAPH,
            "max_abs_diff": max((v["logits"] for v in by_shape.values()), default=None),
            "greedy": "— (logits only)",
            "tokenizer": OWN_TOKENIZER,
            "decode_ms": None,
        },
        {
            "format": layout.KV_GRAPH,
            "max_abs_diff": max((v["kv"] for v in by_shape.values()), default=None),
            "greedy": _fraction(metrics.get("generation_matches"), prompts),
            "tokenizer": OWN_TOKENIZER,
            "decode_ms": _ms(timings, layout.KV_GRAPH),
        },
    ]
    architecture = metrics.get("architecture")
    if architecture:
        rows.append(
            {
                "format": layout.ARCHITECTURE_GRAPH,
                "max_abs_diff": architecture.get("max_abs_diff"),
                "greedy": _fraction(architecture.get("generation_matches"), architecture.get("generation_prompts")),
                "tokenizer": OWN_TOKENIZER,
                "decode_ms": None,
            }
        )
    for key, name in (
        ("hf", f"{layout.HF_DIR}/ (transformers)"),
        ("gguf", f"{layout.GGUF_FILE} (transformers GGUF reader)"),
    ):
        figures = metrics.get(key)
        if figures:
            rows.append(
                {
                    "format": name,
                    "max_abs_diff": figures.get("max_abs_diff"),
                    "greedy": _fraction(figures.get("generation_matches"), figures.get("generation_prompts")),
                    "tokenizer": _fraction(figures.get("tokenizer_matches"), figures.get("tokenizer_texts")),
                    "decode_ms": None,
                }
            )
    genai = metrics.get("genai")
    if genai:
        rows.append(
            {
                "format": f"{layout.GENAI_DIR}/ (onnxruntime-genai)",
                "max_abs_diff": genai.get("max_abs_diff"),
                "greedy": _fraction(genai.get("generation_matches"), genai.get("generation_prompts")),
                "tokenizer": _fraction(genai.get("tokenizer_matches"), genai.get("tokenizer_texts")),
                "decode_ms": _ms(timings, layout.GENAI_DIR),
            }
        )
    quantized = metrics.get("quantized")
    if quantized:
        tolerance = quantized["tolerance"]
        rows.append(
            {
                "format": f"{quantized['folder']}/ (onnxruntime-genai {quantized['precision']})",
                "max_abs_diff": None,
                "greedy": None,
                "tokenizer": _fraction(quantized.get("tokenizer_matches"), quantized.get("tokenizer_texts")),
                "decode_ms": _ms(timings, quantized["folder"]),
                "quality": (
                    f"exact match {quantized['exact_match']:.3f} vs fp32 {quantized['exact_match_fp32']:.3f} "
                    f"(allowed drop {tolerance['exact_match_drop']:g}); bits/byte {quantized['bpb']:.4f} vs "
                    f"{quantized['bpb_fp32']:.4f} (allowed rise {tolerance['bpb_rise']:g}); "
                    + ("passed" if quantized["passed"] else f"rejected: {quantized['reason']}")
                ),
            }
        )
    served = metrics.get("serve")
    for row in rows:
        row["served"] = served is not None and row["format"].split(" ")[0].rstrip("/") == served
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
        key = row["format"].split(" ")[0].rstrip("/")
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
