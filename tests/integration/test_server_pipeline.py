"""The micro pipeline against a real Prefect server, MLflow server (SQLite + S3) and moto S3.

Everything is asserted through the servers' own HTTP APIs (and the bucket through boto3):
the flow run and its artifacts in Prefect, the parent/child runs and the registered model in
MLflow, the stage outputs and their manifests in the bucket, and reuse on the second run.
"""

from __future__ import annotations

import json

import pytest

from stages import registry

from ._servers import http_json, s3_client

pytestmark = pytest.mark.slow

STAGES = list(registry.ORDER)


def prefect_runs(services, server_pipeline) -> list[dict]:
    """The session pipeline's flow runs, oldest first: other tests of the session run flows on the same
    server (three nightly runs, a deployment's), so they are told apart by the store they wrote to."""
    body = {
        "flows": {"name": {"any_": ["gptpipe"]}},
        "flow_runs": {"deployment_id": {"is_null_": True}},
        "sort": "START_TIME_ASC",
    }
    wanted = f"artifacts.store={server_pipeline['store']}"
    runs = http_json(f"{services.prefect_url}/flow_runs/filter", body)
    return [run for run in runs if wanted in (run.get("parameters") or {}).get("overrides", [])]


def mlflow(services, endpoint: str, body: dict | None = None, **query: str) -> dict:
    from urllib.parse import urlencode

    url = f"{services.mlflow_url}/api/2.0/mlflow/{endpoint}" + (f"?{urlencode(query)}" if query else "")
    return http_json(url, body)


def children(services, parent_id: str) -> dict[str, dict]:
    parent = mlflow(services, "runs/get", run_id=parent_id)["run"]
    found = mlflow(
        services,
        "runs/search",
        {
            "experiment_ids": [parent["info"]["experiment_id"]],
            "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
            "max_results": 100,
        },
    )["runs"]
    return {tag["value"]: run for run in found for tag in run["data"]["tags"] if tag["key"] == "gptpipe.stage"}


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_flow_runs_completed_with_report_artifact(services, server_pipeline):
    runs = prefect_runs(services, server_pipeline)
    assert len(runs) >= 2, runs
    first = runs[-2]
    assert all(run["state_type"] == "COMPLETED" for run in runs[-2:])
    artifacts = http_json(
        f"{services.prefect_url}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}}
    )
    by_key = {a["key"]: a for a in artifacts}
    report = by_key["gptpipe-report-micro"]
    assert report["type"] == "markdown"
    assert "report card" in report["data"] and "pretrain" in report["data"]
    assert "gptpipe-micro" in report["data"], "the registered model version belongs in the report card"
    mlflow_link = by_key["gptpipe-mlflow-micro"]
    assert mlflow_link["type"] == "markdown" or mlflow_link["type"] == "link"
    assert services.mlflow_url in mlflow_link["data"]
    assert "gptpipe-netron-micro" in by_key


def test_tasks_are_named_and_tagged_and_stage_logs_reach_prefect(services, server_pipeline):
    first = prefect_runs(services, server_pipeline)[-2]
    tasks = http_json(f"{services.prefect_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [first["id"]]}}})
    by_name = {t["name"]: t for t in tasks}
    for stage in STAGES:
        task = by_name[f"{stage} · micro"]
        assert {f"stage:{stage}", "recipe:micro"} <= set(task["tags"])
        assert task["state_type"] == "COMPLETED"
    assert any(name.startswith("register-model") for name in by_name)
    logs = http_json(
        f"{services.prefect_url}/logs/filter", {"logs": {"flow_run_id": {"any_": [first["id"]]}}, "limit": 200}
    )
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith("stage pretrain: finished") for m in messages), messages[:20]


def test_mlflow_parent_and_children_hold_params_metrics_and_artifacts(services, server_pipeline):
    parent_id = server_pipeline["runs"][0]["parent_run_id"]
    parent = mlflow(services, "runs/get", run_id=parent_id)["run"]
    assert parent["info"]["status"] == "FINISHED"
    assert parent["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    kids = children(services, parent_id)
    assert sorted(kids) == sorted(STAGES)
    pretrain = kids["pretrain"]
    params = {p["key"] for p in pretrain["data"]["params"]}
    assert "pretrain.max_steps" in params
    history = mlflow(services, "metrics/get-history", run_id=pretrain["info"]["run_id"], metric_key="train_loss")
    assert len(history["metrics"]) >= 2
    metric_keys = {m["key"] for m in pretrain["data"]["metrics"]}
    assert "system/cpu_utilization_percentage" in metric_keys and "system/system_memory_usage_megabytes" in metric_keys
    for stage, run in kids.items():
        listed = mlflow(services, "artifacts/list", run_id=run["info"]["run_id"])
        assert "manifest.json" in {f["path"] for f in listed.get("files", [])}, stage
    # The artifacts really are in the bucket, under the server's --artifacts-destination.
    s3 = s3_client(services)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="gptpipe", Prefix="mlartifacts/")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{pretrain['info']['run_id']}/artifacts/manifest.json") for k in keys)
    assert any(k.endswith("onnx_model/MLmodel") for k in keys)
    assert any(k.endswith("onnx_model/artifacts/onnx/model.onnx") for k in keys)
    assert any(k.endswith("report_card.md") for k in keys)


def test_exported_onnx_is_a_registered_model_version(services, server_pipeline):
    found = mlflow(services, "model-versions/search", filter="name = 'gptpipe-micro'")["model_versions"]
    assert len(found) == 1, "the second run reuses the export, so it must not register it again"
    version = found[0]
    version_tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert float(version_tags["parity.max_abs_diff"]) <= float(version_tags["parity.tolerance"])
    assert version_tags["gptpipe.artifact"].startswith("s3://gptpipe/store/export/")
    export_child = children(services, server_pipeline["runs"][0]["parent_run_id"])["export"]
    assert version["run_id"] == export_child["info"]["run_id"]
    files = {
        f["path"] for f in mlflow(services, "artifacts/list", run_id=version["run_id"], path="onnx_model")["files"]
    }
    assert {"onnx_model/MLmodel", "onnx_model/parity.json", "onnx_model/artifacts"} <= files
    graphs = {
        f["path"]
        for f in mlflow(services, "artifacts/list", run_id=version["run_id"], path="onnx_model/artifacts/onnx")["files"]
    }
    assert {
        "onnx_model/artifacts/onnx/model.onnx",
        "onnx_model/artifacts/onnx/model_kv.onnx",
        "onnx_model/artifacts/onnx/tokenizer",
    } <= graphs
    for run in server_pipeline["runs"]:
        parent = mlflow(services, "runs/get", run_id=run["parent_run_id"])["run"]
        assert tags(parent)["gptpipe.registered_model"] == f"gptpipe-micro/{version['version']}"


def test_store_outputs_have_manifests(services, server_pipeline):
    s3 = s3_client(services)
    kids = children(services, server_pipeline["runs"][0]["parent_run_id"])
    for stage, run in kids.items():
        uri = tags(run)["gptpipe.artifact"]
        assert uri.startswith(f"s3://gptpipe/store/{stage}/")
        key = uri[len("s3://gptpipe/") :] + "/manifest.json"
        manifest = json.loads(s3.get_object(Bucket="gptpipe", Key=key)["Body"].read())
        assert manifest["stage"] == stage
        listed = {
            o["Key"][len(key) - len("manifest.json") :]
            for o in s3.list_objects_v2(Bucket="gptpipe", Prefix=key[: -len("manifest.json")])["Contents"]
        }
        # Files sit under the digest of the manifest that lists them (stages.storage.stores).
        assert {f"{manifest['digest']}/{rel}" for rel in manifest["files"]} | {"manifest.json"} == listed, stage


def test_second_run_reuses_every_stage(services, server_pipeline):
    first, second = server_pipeline["runs"]
    table = second["stdout"][second["stdout"].find("gptpipe report card") :]
    assert "reused by content key (nothing recomputed): " + ", ".join(STAGES) in table, table
    kids = children(services, second["parent_run_id"])
    assert sorted(kids) == sorted(STAGES)
    assert all(tags(run)["gptpipe.reused"] == "true" for run in kids.values())
    before = {s: tags(r)["gptpipe.artifact"] for s, r in children(services, first["parent_run_id"]).items()}
    assert before == {s: tags(r)["gptpipe.artifact"] for s, r in kids.items()}
