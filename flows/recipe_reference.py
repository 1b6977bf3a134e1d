"""The recipe reference: every key of the schema with its default and description.

``gptpipe config --reference`` prints it; the README embeds it, and a test checks the two
agree, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from stages.config import PipelineConfig


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value


def reference_rows(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(reference_rows(annotation, f"{key}."))
        else:
            rows.append((key, _default(field), (field.description or "").replace("|", "\\|")))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {text} |" for key, default, text in reference_rows()]
    return "\n".join(lines) + "\n"
