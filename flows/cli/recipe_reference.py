"""The recipe reference: every key of the schema with its default and description.

``gptpipe config --reference`` prints it; docs/reference.md embeds it, and tests/test_readme.py
checks the two agree, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from stages.core.config import PipelineConfig


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
            continue
        rows.append((key, _default(field), (field.description or "").replace("|", "\\|")))
        value_type = get_args(annotation)[-1] if get_origin(annotation) is dict else None
        if isinstance(value_type, type) and issubclass(value_type, BaseModel):
            # A map of sections (e.g. execution.resources.<stage>): document one entry's keys.
            rows.extend(reference_rows(value_type, f"{key}.<{_placeholder(annotation)}>."))
    return rows


def _placeholder(annotation: Any) -> str:
    """``dict[StageName, X]`` -> 'stage' (a Literal of names), else 'name'."""
    key_type = get_args(annotation)[0]
    return "stage" if get_origin(key_type) is Literal else "name"


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {text} |" for key, default, text in reference_rows()]
    return "\n".join(lines) + "\n"
