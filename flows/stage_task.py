"""The Prefect task that runs one stage call through the executor.

The task body is one line: ``stages.executor.execute`` finds or builds the output, opens the
stage's MLflow child run, runs the stage (in this process, or under torchrun when its section
asks for several processes) and commits. What Prefect adds is the retry policy: only
transient failures are retried. A ``GptpipeError`` (bad config, bad data, parity failure)
would fail the same way again, so it fails at once — unless it says it is transient (an S3
endpoint that could not be reached after botocore's own retries may be back a minute later; a
preempted training run resumes from its checkpoint). Nothing is retried in a process that was itself
asked to stop (SIGTERM, SIGINT, a preemption notice): it is going away, and a retry here would train
on until the platform's SIGKILL; the rerun elsewhere resumes from the checkpoint the stop left.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.core.errors import GptpipeError
from stages.executor import execute
from stages.stage_call import StageCall
from stages.training.preemption import stop_reason

log = logging.getLogger("gptpipe.flow")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may succeed on a second try: a GptpipeError only when it says ``transient``, and
    nothing once this process was asked to stop."""
    if stop_reason() is not None:
        return False
    try:
        state.result()
    except GptpipeError as exc:
        return bool(getattr(exc, "transient", False))
    except Exception:
        return True
    return False


@task(
    name="stage",
    task_run_name="{call[stage]}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def stage_task(call: dict[str, Any]) -> dict[str, Any]:
    """Run the stage call (or reuse its finished output) and return its record for the next stages."""
    try:
        result = execute(StageCall.from_dict(call))
    except GptpipeError as exc:
        log.error("stage %s failed: %s", call["stage"], exc)
        raise
    if result.reused:
        log.info(
            "%s: reused finished output (content key %s) at %s", call["stage"], result.manifest.key, result.ref.uri
        )
    return result.record()
