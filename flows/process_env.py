"""The environment gptpipe's processes run with, unless the user set a variable: one place for the
``gptpipe`` command, the runs a Prefect worker starts and the test processes.

Set before Prefect, MLflow or torch loads (each reads these once).
"""

from __future__ import annotations

from stages.core.cpu_threads import WAIT_POLICY

# Every process that runs the pipeline or a stage, the runs a worker starts included (flows.deploy
# puts these in each deployment's job variables): the stages' log lines reach the flow-run log,
# MLflow logs as it goes (a run's figures are all there when its stage ends), GitPython stays quiet
# on a machine without git, and idle CPU threads sleep (stages.core.cpu_threads).
RUN_ENV = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "gptpipe",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    **WAIT_POLICY,
}

# A process that may start a temporary Prefect server of its own (``gptpipe run`` without
# PREFECT_API_URL, the tests): no telemetry, and time for the server's first start, which migrates
# a fresh database; on 2 busy cores that took longer than Prefect's default 20 s wait and failed
# ``make run`` on a new machine.
EMBEDDED_ENV = {
    **RUN_ENV,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
