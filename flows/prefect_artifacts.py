"""What a pipeline run shows in the Prefect UI: the report card and links, as flow-run artifacts.

Up to four artifacts are attached to the flow run (keys are stable per recipe, so the Prefect UI
keeps a history of each across runs):

* ``gptpipe-report-<recipe>`` — the report card (markdown) plus the registered model version;
* ``gptpipe-promotion-<recipe>`` — the promotion gate's decision on that version and its reasons;
* ``gptpipe-mlflow-<recipe>`` — a link to the MLflow parent run (an http tracking server), or
  the ``mlflow ui`` command for an embedded SQLite store;
* ``gptpipe-netron-<recipe>`` — where the Netron bundle's ``index.html`` lives.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from flows import mlflow_links
from flows.report import promotion_markdown, report_markdown


def slug(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-") or "recipe"


def netron_location(report: dict[str, Any]) -> str | None:
    """The bundle's landing page: a file:// URL for a local store, the s3:// object otherwise."""
    publish = report["stages"].get("publish")
    if not publish or not publish["metrics"].get("enabled", False):
        return None
    uri = publish["ref"]["uri"]
    from stages.publish import LANDING

    if uri.startswith("s3://"):
        return f"{uri}/{LANDING}"
    return (Path(uri) / LANDING).resolve().as_uri()


def architecture_image(report: dict[str, Any]) -> str | None:
    """Markdown showing the export's architecture picture inline (a data URI: no file beside the card needed)."""
    path = report.get("architecture_svg")
    if not path or not Path(path).is_file():
        return None
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![model architecture: embedding, Block x N, norm, lm_head](data:image/svg+xml;base64,{encoded})"


def full_markdown(report: dict[str, Any]) -> str:
    """The report card plus the lines only a whole pipeline run knows (registry, links, the architecture)."""
    lines = [report_markdown(report).rstrip("\n"), ""]
    image = architecture_image(report)
    if image:
        lines += ["**The model** (architecture.onnx's top level, and what one Block holds):", "", image, ""]
    model = report.get("registered_model")
    if model:
        state = "already registered" if model.get("reused") else "registered"
        lines.append(f"**Model registry:** `{model['name']}` version **{model['version']}** ({state})")
        url = mlflow_links.model_url(report.get("tracking_uri"), model)
        if url:
            lines.append(f"[open the model version]({url})")
    run_url = mlflow_links.run_url(report.get("tracking_uri"), report.get("experiment_id"), report.get("parent_run_id"))
    if run_url:
        lines.append(f"\n**MLflow run:** [{report.get('parent_run_id')}]({run_url})")
        everything = mlflow_links.experiment_url(report.get("tracking_uri"), report.get("experiment_id"))
        lines.append(f"([every run of the experiment]({everything}))")
    elif report.get("tracking_uri"):
        lines.append(
            f"\n**MLflow run** `{report.get('parent_run_id')}`: `{mlflow_links.ui_command(report['tracking_uri'])}`"
        )
    netron = netron_location(report)
    if netron:
        lines.append(f"\n**Netron bundle:** {netron}")
    lines.append(f"\nArtifact store: `{report['store']}`")
    return "\n".join(lines) + "\n"


def publish_artifacts(report: dict[str, Any]) -> list[str]:
    """Attach the report card and links to the current flow run; returns the artifact keys."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    recipe = slug(report["recipe"])
    keys = [f"gptpipe-report-{recipe}"]
    create_markdown_artifact(
        markdown=full_markdown(report), key=keys[0], description=f"gptpipe report card, recipe {report['recipe']}"
    )
    promotion = report.get("promotion")
    if promotion:
        keys.append(f"gptpipe-promotion-{recipe}")
        create_markdown_artifact(
            markdown=f"# Promotion gate — {report['recipe']}\n\n{promotion_markdown(promotion)}",
            key=keys[-1],
            description=f"{promotion['name']} version {promotion['version']}: {promotion['decision'] or 'no decision'}",
        )
    run_url = mlflow_links.run_url(report.get("tracking_uri"), report.get("experiment_id"), report.get("parent_run_id"))
    if run_url:
        keys.append(f"gptpipe-mlflow-{recipe}")
        create_link_artifact(
            link=run_url,
            link_text=f"MLflow run {report['parent_run_id']}",
            key=keys[-1],
            description="MLflow parent run of this pipeline run (child runs per stage)",
        )
    netron = netron_location(report)
    if netron:
        keys.append(f"gptpipe-netron-{recipe}")
        create_link_artifact(
            link=netron,
            link_text="Netron bundle (index.html)",
            key=keys[-1],
            description="Serve with: python -m stages.viewer.serve serve <bundle dir>",
        )
    return keys
