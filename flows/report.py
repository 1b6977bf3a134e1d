"""The report card: one table of stage, status, wall time, key metrics and where things are."""

from __future__ import annotations

from typing import Any

from flows import mlflow_links
from stages import registry
from stages.viewer.eval_report import COMPARED

# The status of a stage not run because its output is the parent model's (continue_from: the tokenizer).
FROM_PARENT = "from parent"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def _headline(stage: str, metrics: dict[str, Any]) -> str:
    keys = registry.stage(stage).shown if stage in registry.ORDER else ()
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)


def registered(model: dict[str, Any]) -> str:
    return f"{model['name']} version {model['version']}" + (" (same export as before)" if model.get("reused") else "")


def promotion_summary(promotion: dict[str, Any]) -> str:
    """One sentence: what the promotion gate decided for the registered version (or that it stands)."""
    version, compared = promotion["version"], promotion.get("compared_with")
    against = f"compared with champion version {compared}" if compared else "no champion to compare with"
    if promotion.get("unchanged"):
        said = promotion.get("decision") or "none recorded"
        return f"existing version {version}, decision unchanged ({said}; {against})"
    policy = f"registry.promote={promotion.get('policy', 'gate')}"
    if promotion["decision"] == "promote":
        return f"version {version} promoted to champion ({policy}; {against})"
    stays = f"champion stays version {compared}" if compared else "no champion"
    return f"version {version} held as challenger, {stays} ({policy}; {against})"


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    out = []
    for name, result in report["stages"].items():
        status = result.get("status") or ("reused" if result["reused"] else "ran")
        wall = f"{result['wall_time_s']:.1f}s" if status == "ran" else "-"
        if status == "waited":
            status = f"waited {result['waited_s']:.0f}s"
        out.append((name, status, wall, _headline(name, result["metrics"]), result["ref"]["uri"]))
    return out


def findings(report: dict[str, Any]) -> list[str]:
    """Each stage's diagnosis sentences (evaluate's: a dominant answer, answers that never stop, ...)."""
    return [
        f"{name}: {finding}"
        for name, result in report["stages"].items()
        for finding in result["metrics"].get("diagnosis") or ()
    ]


def comparison(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (figure, champion, challenger, difference) when evaluate scored this run beside the champion."""
    metrics = report["stages"].get("evaluate", {}).get("metrics", {})
    out = []
    for label, key, value, change in COMPARED:
        ours, theirs = metrics.get(f"challenger_{key}"), metrics.get(f"champion_{key}")
        if ours is not None and theirs is not None:
            out.append((label, value.format(theirs), value.format(ours), change.format(ours - theirs)))
    return out


def render_report(report: dict[str, Any]) -> str:
    """Plain-text table for the terminal."""
    header = ("stage", "status", "time", "key metrics", "artifact")
    table = [header, *rows(report)]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = [f"\ngptpipe report card — recipe '{report['recipe']}'"]
    for i, row in enumerate(table):
        cells = [row[c].ljust(widths[c]) for c in range(4)] + [row[4]]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  --------")
    diagnosis = findings(report)
    if diagnosis:
        lines.append("diagnosis:")
        lines += [f"  - {finding}" for finding in diagnosis]
    certificate = _certificate(report)
    if certificate:
        lines.append("equivalence certificate (export):")
        lines += [f"  {line}" for line in certificate.splitlines()]
    compared = comparison(report)
    if compared:
        table = [("", f"champion (version {report.get('champion_version')})", "challenger (this run)", "difference")]
        table += compared
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines.append("challenger vs champion (evaluate, same held-out material):")
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)).rstrip() for r in table]
    total = sum(r["wall_time_s"] for r in report["stages"].values())
    lines.append(f"pipeline time (stages): {total:.1f}s")
    reused = [n for n, r in report["stages"].items() if r["reused"] and r.get("status") != FROM_PARENT]
    if reused:
        lines.append(f"reused by content key (nothing recomputed): {', '.join(reused)}")
    inherited = [n for n, r in report["stages"].items() if r.get("status") == FROM_PARENT]
    if inherited:
        lines.append(f"from the parent model, {report.get('continued_from')} (not rerun): {', '.join(inherited)}")
    if report.get("tokenizer_drift"):
        lines.append(report["tokenizer_drift"])
    lines.append(f"artifact store: {report['store']}")
    model = report.get("registered_model")
    if model:
        lines.append(f"model registry: {registered(model)}")
    promotion = report.get("promotion")
    if promotion:
        lines.append(f"promotion: {promotion_summary(promotion)}")
        lines += [f"  - {reason}" for reason in promotion["reasons"]]
    publish = report["stages"].get("publish")
    if publish and publish["ref"]["uri"].startswith("/"):
        bundle = publish["ref"]["uri"]
        lines.append(
            f"Netron viewer: {bundle}/index.html — serve it with:\n  python -m stages.viewer.serve serve {bundle}"
        )
    uri, experiment = report.get("tracking_uri"), report.get("experiment_id")
    ui = mlflow_links.ui_command(uri)
    if ui:
        page = mlflow_links.run_url(uri, experiment, report.get("parent_run_id"))
        if page is None:  # an embedded store: the page exists once `mlflow ui` is up
            local = mlflow_links.local_ui()
            page = mlflow_links.experiment_url(uri, experiment, base=local) or local
            ui += f"\n  then open {page}"
        else:
            ui = f"open {page}"
        lines.append(f"MLflow run {report.get('parent_run_id')}; look at it in the MLflow UI:\n  {ui}")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    """The same table as Markdown, attached to the MLflow parent run."""
    lines = [
        f"# gptpipe report card — {report['recipe']}",
        "",
        "| stage | status | time | key metrics | artifact |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | `{e}` |" for a, b, c, d, e in rows(report)]
    diagnosis = findings(report)
    if diagnosis:
        lines += ["", "## Diagnosis", "", *[f"- {finding}" for finding in diagnosis]]
    certificate = _certificate(report)
    if certificate:
        lines += ["", "## Equivalence certificate (export)", "", certificate.rstrip("\n")]
    compared = comparison(report)
    if compared:
        lines += ["", "## Challenger vs champion", ""]
        lines += [f"| | champion (version {report.get('champion_version')}) | challenger (this run) | difference |"]
        lines += ["|---|---|---|---|", *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in compared]]
    promotion = report.get("promotion")
    if promotion:
        lines += ["", "## Promotion", "", promotion_markdown(promotion).rstrip("\n")]
    return "\n".join(lines) + "\n"


def promotion_markdown(promotion: dict[str, Any]) -> str:
    """The promotion decision and its reasons as Markdown (the report card's section, the Prefect artifact)."""
    head = f"`{promotion['name']}`: {promotion_summary(promotion)}"
    return "\n".join([head, "", *[f"- {reason}" for reason in promotion["reasons"]]]) + "\n"


def _certificate(report: dict[str, Any]) -> str:
    """The export's equivalence certificate as a Markdown table, or '' when no export ran with one."""
    from stages.formats.certificate import certificate_markdown

    export = report["stages"].get("export")
    rows = export and export["metrics"].get("certificate")
    return certificate_markdown(rows) if rows else ""
