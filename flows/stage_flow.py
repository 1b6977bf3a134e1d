"""One stage as its own flow: what runs inside a stage container (``execution.mode: containers``).

Prefect sets infrastructure (image, GPUs, memory) per *deployment*, so each stage gets a
deployment of this flow, named after the stage (``gptpipe-stage/pretrain``). The pipeline flow
starts them with ``run_deployment`` (``flows/containers.py``); a Docker or Kubernetes worker
turns each flow run into a container. Inside, the flow calls the very same ``stage_task``
the in-process pipeline uses — one stage call through one executor: same store, same MLflow
child run under the pipeline's parent run, same retries — and then leaves a *handoff* record on
its flow run: a table artifact with
the output's reference and summary, which the pipeline reads back through the Prefect API.
Artifact bytes never pass through Prefect: they are in the shared (S3) store. A stage the
platform stops (``podman stop``, a pod evicted, a spot notice: the image's entrypoint passes
SIGTERM to this engine) checkpoints and ends in the state ``Failed`` named ``Preempted``, which
the pipeline answers with a new flow run (a new container) that resumes from the checkpoints
mirrored beside the store.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.states import Failed

from flows.run_logs import explain_errors_in_one_line, forward_stage_logs
from flows.stage_task import stage_task
from stages.training.preemption import Preempted

HANDOFF_KEY = "gptpipe-stage-output"
FLOW_NAME = "gptpipe-stage"
PREEMPTED = "Preempted"  # the final state's name when the stage stopped on SIGTERM/SIGINT or a spot notice


def handoff_row(result: dict[str, Any]) -> dict[str, Any]:
    """The stage result as one table row: scalars as they are, nested values as JSON text."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, sort_keys=True)
        for k, v in result.items()
    }


def read_handoff_row(row: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``handoff_row`` for the fields that hold JSON."""
    out = dict(row)
    for key in ("ref", "metrics"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


@flow(name=FLOW_NAME, flow_run_name="{call[stage]}", log_prints=True)
def stage_flow(call: dict[str, Any]) -> dict[str, Any]:
    """Run one stage call (``stages.stage_call.StageCall`` as JSON) and hand its output reference back
    to the pipeline."""
    from prefect.artifacts import create_table_artifact

    forward_stage_logs()
    explain_errors_in_one_line()
    try:
        result = stage_task(call)
    except Preempted as exc:  # the platform is stopping this container: a state the pipeline restarts
        return Failed(name=PREEMPTED, message=str(exc))
    create_table_artifact(
        [handoff_row(result)],
        key=HANDOFF_KEY,
        description=f"Output of stage {call['stage']}: {result['ref']['uri']} (read back by the pipeline flow)",
    )
    return result
