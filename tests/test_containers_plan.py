"""Containers mode without containers: the recipe's per-stage requests as work-pool job variables,
and the handoff record a stage flow leaves for the pipeline. The real thing (podman, a docker
worker, one container per stage) is tests/integration/test_containers.py."""

from __future__ import annotations

import json
from pathlib import Path

import docker.types
import pytest

from flows.containers import job_variables
from flows.stage_flow import handoff_row, read_handoff_row
from stages.core.config import parse_config
from stages.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def recipe(**execution):
    return parse_config({"artifacts": {"store": "s3://bucket/store"}, "execution": {"mode": "containers", **execution}})


def test_docker_pool_gets_a_gpu_device_request_docker_py_accepts():
    cfg = recipe(
        resources={"pretrain": {"gpus": 8, "memory": "200Gi", "image": "reg/gptpipe:1"}}, env={"NCCL_DEBUG": "WARN"}
    )
    variables = job_variables(cfg, "pretrain", "docker")
    assert variables["image"] == "reg/gptpipe:1" and variables["mem_limit"] == "200g"  # Docker's notation
    assert variables["env"] == {"NCCL_DEBUG": "WARN"}
    (request,) = variables["container_create_kwargs"]["device_requests"]
    built = docker.types.DeviceRequest(**request)  # what docker-py does with a dict before the API call
    assert built["Count"] == 8 and built["Driver"] == "nvidia" and built["Capabilities"] == [["gpu"]]
    # A stage without requests asks for nothing: the deployment's (pool's) defaults apply.
    assert job_variables(cfg, "tokenizer", "docker") == {"env": {"NCCL_DEBUG": "WARN"}}


def test_kubernetes_variables_are_the_ones_the_pool_template_defines():
    cfg = recipe(resources={"pretrain": {"gpus": 8, "cpu": "32", "memory": "200Gi"}, "tokenizer": {"gpus": 0}})
    variables = job_variables(cfg, "pretrain", "kubernetes")
    assert variables == {"gpu_count": 8, "cpu": "32", "memory": "200Gi"}
    assert job_variables(cfg, "tokenizer", "kubernetes") == {"gpu_count": 0, "node_selector": {}}
    import yaml

    template = yaml.safe_load((ROOT / "infra" / "k8s" / "pool-template.yaml").read_text())
    defined = json.loads(template["data"]["kubernetes-pool.json"])["variables"]["properties"]
    assert set(variables) <= set(defined)  # an unknown job variable would be silently ignored


def test_execution_section_is_validated():
    with pytest.raises(ConfigError, match="execution.mode"):
        parse_config({"execution": {"mode": "kubernetes"}})
    with pytest.raises(ConfigError, match="gpus"):
        parse_config({"execution": {"resources": {"pretrain": {"gpus": -1}}}})
    with pytest.raises(ConfigError, match="pretrainn"):
        parse_config({"execution": {"resources": {"pretrainn": {"gpus": 1}}}})
    assert parse_config({}).execution.mode == "local"


def test_handoff_record_round_trips_through_a_table_row():
    result = {
        "stage": "data",
        "ref": {"stage": "data", "uri": "s3://b/store/data/abc", "digest": "f00"},
        "reused": False,
        "wall_time_s": 1.5,
        "metrics": {"train_tokens": 10, "nested": {"a": 1}},
        "run_id": None,
        "experiment_id": "1",
    }
    row = handoff_row(result)
    assert all(isinstance(v, (str, int, float, bool)) or v is None for v in row.values())
    assert read_handoff_row(json.loads(json.dumps(row))) == result


def test_containers_mode_fails_fast_without_a_server_or_a_shared_store(monkeypatch):
    from flows.containers import check_containers_mode

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with pytest.raises(ConfigError, match="artifacts.store='runs/store'.*s3://"):  # the recipe alone says so
        parse_config({"execution": {"mode": "containers"}})
    check_containers_mode(
        parse_config({"artifacts": {"store": "s3://bucket/store"}, "execution": {"mode": "containers"}})
    )
    monkeypatch.delenv("PREFECT_API_URL")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            check_containers_mode(
                parse_config({"artifacts": {"store": "s3://b/s"}, "execution": {"mode": "containers"}})
            )


@pytest.mark.slow
def test_a_stage_container_that_never_finishes_is_a_container_error(prefect_harness, tmp_path):
    """A stage's flow run that does not complete (here: no worker ever picks it up) fails the
    pipeline with the project's ContainerError in one line, not as a training failure."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.containers import deploy_stages, run_stage_in_container
    from stages.core.errors import ContainerError
    from stages.stage_call import StageCall

    async def make_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="no-worker", type="process"))

    run_coro_as_sync(make_pool())
    deploy_stages("no-worker", None, {}, ["tokenizer"])
    cfg = parse_config(
        {"artifacts": {"store": str(tmp_path / "store")}, "execution": {"mode": "containers", "timeout_s": 1}}
    )
    with pytest.raises(ContainerError) as err:
        run_stage_in_container(StageCall.for_recipe("tokenizer", cfg, {}), cfg)
    message = str(err.value)
    assert "stage tokenizer" in message and "gptpipe-stage/tokenizer" in message and "\n" not in message, message
