"""Per-stage containers: the pipeline flow runs each stage as a flow run of its own deployment.

With ``execution.mode: containers`` the pipeline flow does not run a stage in its own process:
it calls ``run_deployment("gptpipe-stage/<stage>")`` and waits. The deployment's work pool
(Docker or Kubernetes) starts a container from the gptpipe image, which runs
``flows.stage_flow`` — the same stage task as in-process runs — reading its inputs from and
writing its output to the shared store (S3), and logging an MLflow child run under the
pipeline's parent run. The recipe's ``execution.resources.<stage>`` become *job variables*
of that one flow run, translated for the pool's type:

* docker: ``image``, ``mem_limit``, GPUs as a Docker device request (``--gpus N``);
* kubernetes: ``image``, ``gpu_count``, ``cpu``, ``memory`` (and ``node_selector: {}`` for a
  stage asking for no GPU) — variables of the base job template in ``infra/k8s/pool-template.yaml``.

A stage whose output already exists in the store (same content key) is not sent to a
container: it is reused in-process, which costs a store lookup instead of a container start.
``gptpipe deploy --stages`` creates the per-stage deployments.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flows.stage_flow import FLOW_NAME, HANDOFF_KEY, PREEMPTED, read_handoff_row
from stages.core.config import PipelineConfig, StageResources
from stages.core.errors import ConfigError, ContainerError, GptpipeError
from stages.executor import call_key
from stages.stage_call import StageCall
from stages.storage.stores import open_store

log = logging.getLogger("gptpipe.flow")

# Stage entrypoint inside the image: a module path, because the code is installed in the image's
# venv, not checked out at a working directory.
STAGE_ENTRYPOINT = "flows.stage_flow:stage_flow"


def check_containers_mode(cfg: PipelineConfig) -> None:
    """Fail before any stage runs when containers could not work: no shared Prefect server that
    workers poll. (A store the containers cannot see depends only on the recipe: its validation
    refuses that, in ``stages/core/config.py``.)"""
    from prefect.settings import PREFECT_API_URL

    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise ConfigError(
            "execution.mode=containers needs a Prefect server that workers poll: set PREFECT_API_URL "
            "(e.g. `gptpipe services up`, then `source runs/services/env.sh`)"
        )


def deployment_name(stage: str) -> str:
    return f"{FLOW_NAME}/{stage}"


def job_variables(cfg: PipelineConfig, stage: str, pool_type: str) -> dict[str, Any]:
    """The recipe's requests for ``stage`` as job variables of a ``pool_type`` work pool."""
    wanted = cfg.execution.resources.get(stage, StageResources())
    variables: dict[str, Any] = {}
    if cfg.execution.env:
        variables["env"] = dict(cfg.execution.env)
    if wanted.image:
        variables["image"] = wanted.image
    if pool_type == "kubernetes":
        variables["gpu_count"] = wanted.gpus
        if wanted.gpus == 0:
            variables["node_selector"] = {}  # a CPU stage may run on any node, not only GPU nodes
        if wanted.cpu:
            variables["cpu"] = wanted.cpu
        if wanted.memory:
            variables["memory"] = wanted.memory
    elif pool_type == "docker":
        if wanted.memory:
            variables["mem_limit"] = docker_memory(wanted.memory)
        if wanted.gpus:
            # What `docker run --gpus N` sends; podman with the NVIDIA CDI hook honours it too.
            variables["container_create_kwargs"] = {
                "device_requests": [{"driver": "nvidia", "count": wanted.gpus, "capabilities": [["gpu"]]}]
            }
    elif wanted.gpus or wanted.cpu or wanted.memory:
        log.warning("work pool type %r: execution.resources.%s (GPUs/CPU/memory) not applied", pool_type, stage)
    return variables


def docker_memory(quantity: str) -> str:
    """A Kubernetes memory quantity ('16Gi') in Docker's notation ('16g'); Docker's own passes through."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g"), ("Ti", "t")):
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + unit
    return quantity


async def _pool_type(deployment: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            found = await client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(
                f"execution.mode=containers: no deployment {deployment!r} on the Prefect server; "
                "create the stage deployments with `gptpipe deploy --stages --pool POOL --pool-type docker --image IMAGE`"
            ) from None
        if not found.work_pool_name:
            raise ConfigError(f"deployment {deployment!r} has no work pool; redeploy it with --pool")
        return (await client.read_work_pool(found.work_pool_name)).type


async def _handoff(flow_run_id: Any) -> dict[str, Any] | None:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[HANDOFF_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    if not found:
        return None
    table = json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data
    return read_handoff_row(table[0]) if table else None


def _finished_here(call: StageCall) -> bool:
    """Whether the store already holds the call's output: then no container is started for it.

    The container's executor asks again (another run may finish the key meanwhile); this first
    look only saves a container start for a stage that is already done.
    """
    if call.force:
        return False
    try:
        return open_store(call.store).find(call.stage, call_key(call)) is not None
    except GptpipeError:
        return False  # e.g. a corpus only the container can read: let the container decide


def run_stage_in_container(call: StageCall, cfg: PipelineConfig) -> dict[str, Any] | None:
    """Run the stage call as a flow run of its stage's deployment and return its handoff record.

    ``cfg`` gives the run's container requests (``execution``) and labels. Returns ``None``
    when the output already exists, so the caller reuses it in-process.
    """
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    name = call.stage
    if _finished_here(call):
        return None
    deployment = deployment_name(name)
    pool_type = run_coro_as_sync(_pool_type(deployment))
    variables = job_variables(cfg, name, pool_type)
    for attempt in range(cfg.execution.restarts + 1):
        log.info("stage %s: starting a flow run of deployment %s (%s pool)", name, deployment, pool_type)
        flow_run = run_deployment(
            deployment,
            parameters={"call": call.to_dict()},
            job_variables=variables,
            timeout=cfg.execution.timeout_s,
            as_subflow=True,
            tags=[f"stage:{name}", f"recipe:{cfg.name}"],
        )
        state = flow_run.state
        stopped = state is not None and (state.name == PREEMPTED or state.is_crashed())
        if not stopped or attempt == cfg.execution.restarts:
            break
        log.warning(
            "stage %s: flow run %r ended %s (the platform stopped its container); starting it again, %d of %d",
            name,
            flow_run.name,
            state.name,
            attempt + 1,
            cfg.execution.restarts,
        )
    if state is None or not state.is_completed():
        what = state.name if state is not None else "no state"
        message = (state.message or "").splitlines()[0] if state is not None and state.message else ""
        raise ContainerError(
            f"stage {name}: flow run {flow_run.name!r} ({flow_run.id}) of {deployment} ended {what}"
            + (f": {message}" if message else "")
            + "; see its logs in the Prefect UI or the worker's output"
        )
    record = run_coro_as_sync(_handoff(flow_run.id))
    if record is None:
        raise ContainerError(
            f"stage {name}: flow run {flow_run.id} completed without its {HANDOFF_KEY!r} artifact; "
            "is the deployment's image built from this version of gptpipe?"
        )
    record["flow_run_id"] = str(flow_run.id)
    return record


def deploy_stages(pool: str, image: str | None, env: dict[str, str], stages: list[str] | None = None) -> list[str]:
    """Create (or update) one deployment of ``stage_flow`` per stage on work pool ``pool``."""
    from flows.stage_flow import stage_flow
    from stages.registry import ORDER

    names = []
    for stage in stages or ORDER:
        deployment = stage_flow.to_deployment(
            name=stage,
            work_pool_name=pool,
            job_variables={"env": env, **({"image": image} if image else {})},
            tags=["gptpipe", f"stage:{stage}"],
            description=f"gptpipe stage {stage}: one container per flow run",
        )
        deployment.entrypoint = STAGE_ENTRYPOINT
        deployment.apply(image=image)
        names.append(deployment_name(stage))
    return names
