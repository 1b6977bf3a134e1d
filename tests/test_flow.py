"""The whole pipeline under a real (temporary) Prefect API, tracked in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory, micro_recipe):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("flow")
    overrides = [f"artifacts.store={root / 'store'}"]
    report = pipeline(config_path=str(micro_recipe), overrides=overrides)
    again = pipeline(config_path=str(micro_recipe), overrides=overrides)
    return root, report, again


def test_every_stage_ran_and_left_a_manifest(flow_run):
    from stages.core.config import load_config
    from stages.storage.artifacts import verify

    root, report, _ = flow_run
    expected = load_config(Path(__file__).parents[1] / "configs" / "micro.yaml").stages
    assert list(report["stages"]) == expected
    for name, result in report["stages"].items():
        assert not result["reused"], name
        manifest = verify(Path(result["ref"]["uri"]))
        assert manifest.stage == name
        assert Path(result["ref"]["uri"]).parent.parent == root / "store"


def test_second_run_reuses_every_stage(flow_run):
    _, report, again = flow_run
    assert all(r["reused"] for r in again["stages"].values())
    assert {n: r["ref"] for n, r in again["stages"].items()} == {n: r["ref"] for n, r in report["stages"].items()}


def test_mlflow_holds_parent_and_child_runs(flow_run):
    from mlflow.tracking import MlflowClient

    root, report, _ = flow_run
    client = MlflowClient(tracking_uri=report["tracking_uri"])
    assert report["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}?timeout=60"
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {run.data.tags["gptpipe.stage"]: run for run in children}
    assert set(by_stage) == set(report["stages"])
    pretrain = by_stage["pretrain"]
    assert "pretrain.max_steps" in pretrain.data.params
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert len(history) >= 2, "the loss curve should have several points"
    for run in children:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "manifest.json" in names, run.data.tags["gptpipe.stage"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report_card.md" in parent_artifacts


def test_report_card_and_runs_show_the_architecture(flow_run):
    import base64
    import json
    import re

    from mlflow.tracking import MlflowClient

    from flows.prefect_artifacts import full_markdown

    root, report, again = flow_run
    export_dir = Path(report["stages"]["export"]["ref"]["uri"])
    n_layer = json.loads((export_dir / "export.json").read_text())["n_layer"]
    for run in (report, again):  # the reused run shows it too
        found = re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", full_markdown(run))
        assert found, "the report card should embed the architecture picture"
        svg = base64.b64decode(found.group(1)).decode()
        assert svg.count('data-op="Block"') == n_layer
    client = MlflowClient(tracking_uri=report["tracking_uri"])
    card = Path(client.download_artifacts(report["parent_run_id"], "report_card.md", str(root / "dl"))).read_text()
    assert "data:image/svg+xml;base64," in card
    assert [a.path for a in client.list_artifacts(report["parent_run_id"], "report")] == ["report/architecture.svg"]
    publish_run = report["stages"]["publish"]["run_id"]
    pages = {a.path for a in client.list_artifacts(publish_run, "netron/standalone")}
    assert "netron/standalone/architecture.onnx.html" in pages and "netron/standalone/model.onnx.html" in pages
