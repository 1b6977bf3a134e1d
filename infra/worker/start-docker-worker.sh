#!/bin/sh
# Entry point of the compose `prefect-worker` service: make sure the docker work pool exists with
# a base job template whose stage containers get the GPUs, join them to the stack's network,
# then poll it. Idempotent: a restart overwrites the pool's template with the same content.
set -eu
pool="${PREFECT_WORK_POOL:?PREFECT_WORK_POOL is not set}"
template=/tmp/docker-pool-template.json

prefect work-pool get-default-base-job-template --type docker > /tmp/default-template.json
# Defaults only: a deployment's job variables still override any of them per stage (e.g. a CPU
# stage sets container_create_kwargs to {} and a different image).
python - /tmp/default-template.json "$template" <<'PY'
import json, os, sys

src, dst = sys.argv[1], sys.argv[2]
template = json.load(open(src))
props = template["variables"]["properties"]
gpus = os.environ.get("GPTPIPE_STAGE_GPUS", "all")
create = {}
if gpus != "0":
    # docker's --gpus: count -1 = all; or a number of devices
    count = -1 if gpus == "all" else int(gpus)
    create["device_requests"] = [{"driver": "nvidia", "count": count, "capabilities": [["gpu"]]}]
    create["shm_size"] = os.environ.get("GPTPIPE_STAGE_SHM_SIZE", "16g")  # NCCL/dataloader shared memory
# Stage containers reach the stack by service name; credentials come from the worker's env.
keys = ["PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "GPTPIPE_ARTIFACT_STORE"]
defaults = {
    "container_create_kwargs": create,
    "image": os.environ["GPTPIPE_IMAGE"],
    "networks": [os.environ["GPTPIPE_STAGE_NETWORK"]],
    "image_pull_policy": os.environ.get("GPTPIPE_IMAGE_PULL_POLICY", "IfNotPresent"),
    "env": {k: os.environ[k] for k in keys if os.environ.get(k)},
}
for name, value in defaults.items():
    if name not in props:  # a prefect-docker without this variable: say so instead of crashing
        print(f"start-docker-worker: docker pool template has no variable {name!r}; not set", file=sys.stderr)
        continue
    props[name]["default"] = value
json.dump(template, open(dst, "w"), indent=2)
PY
prefect work-pool create "$pool" --type docker --base-job-template "$template" --overwrite
exec prefect worker start --pool "$pool" --type docker --with-healthcheck
