"""Scheduled runs: a Prefect deployment of the pipeline flow on a named work pool.

``gptpipe deploy`` registers ``flows/pipeline.py:pipeline`` with a Prefect server (the one
``PREFECT_API_URL`` names) under a cron schedule, with the recipe and ``--set`` overrides
as the flow's parameters. A worker polling the pool runs each scheduled run::

    gptpipe deploy --name nightly --pool gptpipe --cron "0 3 * * *" --config configs/tiny.yaml
    prefect worker start --pool gptpipe

Pools of three kinds are supported:

* ``process`` — the worker runs the flow in a subprocess of its own machine, from this
  project directory (recorded in the deployment as its working directory);
* ``docker`` / ``kubernetes`` — each run is a container (a pod) started from ``--image``,
  an image holding this project at its working directory (``docker/``); the worker needs
  ``prefect-docker`` / ``prefect-kubernetes`` installed where it runs.

``gptpipe deploy --stages`` instead deploys ``flows/stage_flow.py`` once per stage, for
recipes with ``execution.mode: containers`` (see ``flows/containers.py``).

The committed ``prefect.yaml`` holds the same deployments for ``prefect deploy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.process_env import RUN_ENV
from stages.core.config import add_override_argument
from stages.core.errors import ConfigError, GptpipeError

PROJECT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:pipeline"
POOL_TYPES = ("process", "docker", "kubernetes")


@dataclass
class DeploySpec:
    """Everything ``gptpipe deploy`` needs to create one deployment."""

    name: str = "gptpipe-scheduled"
    pool: str = "gptpipe"
    pool_type: str = "process"
    cron: str | None = "0 3 * * *"
    timezone: str = "UTC"
    config_path: str = "configs/tiny.yaml"
    overrides: list[str] = field(default_factory=list)
    force: bool = False
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    tags: list[str] = field(default_factory=list)
    # Overlapping schedules: at most this many runs of the deployment at once (None = no limit);
    # a run due while the limit is reached waits in the queue ("enqueue") or is cancelled ("cancel").
    concurrency_limit: int | None = 1
    collision_strategy: str = "enqueue"

    def parameters(self) -> dict[str, Any]:
        return {"config_path": self.config_path, "overrides": list(self.overrides), "force": self.force}

    def job_variables(self) -> dict[str, Any]:
        variables: dict[str, Any] = {"env": {**RUN_ENV, **self.env}}
        if self.image:
            variables["image"] = self.image
        return variables


def check_spec(spec: DeploySpec) -> None:
    """Fail before touching the server: bad pool type, bad cron, a recipe that does not load."""
    from stages.core.config import load_config

    if spec.pool_type not in POOL_TYPES:
        raise ConfigError(f"--pool-type {spec.pool_type!r}: expected one of {', '.join(POOL_TYPES)}")
    require_image(spec.pool_type, spec.image)
    if spec.cron:
        from cronsim import CronSim, CronSimError

        try:
            CronSim(spec.cron, __import__("datetime").datetime.now())
        except CronSimError as exc:
            raise ConfigError(f"--cron {spec.cron!r}: not a valid cron expression ({exc})") from None
    recipe = Path(spec.config_path)
    # A process worker runs from the project directory: relative recipe paths resolve there.
    load_config(recipe if recipe.is_absolute() else PROJECT / recipe, spec.overrides)


def require_image(pool_type: str, image: str | None) -> None:
    """Container pools start an image: it must be named."""
    if pool_type != "process" and not image:
        raise ConfigError(f"--pool-type {pool_type}: pass --image with the gptpipe image the worker should start")


def pool_of_type(pool: str, pool_type: str) -> None:
    """Create work pool ``pool`` of ``pool_type`` unless it exists; refuse one of another type."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    found_type = run_coro_as_sync(ensure_pool(pool, pool_type))
    if found_type != pool_type:
        raise ConfigError(
            f"--pool {pool}: that pool exists with type {found_type!r}, not {pool_type!r}; "
            "pass --pool-type to match or choose another pool name"
        )


async def ensure_pool(name: str, pool_type: str) -> str:
    """Create work pool ``name`` of ``pool_type`` unless it exists; returns its type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            pool = await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
        return pool.type


def deploy(spec: DeploySpec) -> dict[str, Any]:
    """Create (or update) the deployment; returns its id, name and schedule."""
    from prefect.client.schemas.schedules import CronSchedule

    check_spec(spec)
    pool_of_type(spec.pool, spec.pool_type)
    schedules = [CronSchedule(cron=spec.cron, timezone=spec.timezone)] if spec.cron else None
    limit = None
    if spec.concurrency_limit:
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        strategy = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE, "cancel": ConcurrencyLimitStrategy.CANCEL_NEW}[
            spec.collision_strategy
        ]
        limit = ConcurrencyLimitConfig(limit=spec.concurrency_limit, collision_strategy=strategy)
    common = dict(
        name=spec.name,
        work_pool_name=spec.pool,
        schedules=schedules,
        parameters=spec.parameters(),
        job_variables=spec.job_variables(),
        paused=spec.paused,
        concurrency_limit=limit,
        tags=["gptpipe", *spec.tags],
        description=f"gptpipe pipeline, recipe {spec.config_path}",
        print_next_steps=False,
        ignore_warnings=True,
    )
    try:
        if spec.pool_type == "process":
            from prefect import Flow

            flow = Flow.from_source(source=str(PROJECT), entrypoint=ENTRYPOINT)
            deployment_id = flow.deploy(**common)
        else:
            from flows.pipeline import pipeline

            deployment_id = pipeline.deploy(image=spec.image, build=False, push=False, **common)
    except GptpipeError:
        raise
    except Exception as exc:
        raise GptpipeError(f"deploy {spec.name!r} to pool {spec.pool!r}: {str(exc).splitlines()[0]}") from None
    return {
        "id": str(deployment_id),
        "name": f"gptpipe/{spec.name}",
        "pool": spec.pool,
        "cron": spec.cron,
        "timezone": spec.timezone,
        "parameters": spec.parameters(),
        "concurrency_limit": spec.concurrency_limit,
        "collision_strategy": spec.collision_strategy if spec.concurrency_limit else None,
    }


HELP_EPILOG = """\
work pools:
  process     the worker runs each flow run as a subprocess on its own machine, from this
              project directory; needs this environment (pip install -e .) on the worker:
                gptpipe deploy --pool gptpipe --cron "0 3 * * *" --config configs/tiny.yaml
                prefect worker start --pool gptpipe
  docker      each run is a container from --image (a gptpipe image, see docker/); the worker
              needs prefect-docker and a Docker engine:
                gptpipe deploy --pool gpu-docker --pool-type docker --image REGISTRY/gptpipe:TAG
                prefect worker start --pool gpu-docker --type docker
  kubernetes  each run is a Kubernetes job from --image; the worker needs prefect-kubernetes
              and cluster access (set GPU requests in the pool's base job template):
                gptpipe deploy --pool k8s --pool-type kubernetes --image REGISTRY/gptpipe:TAG
                prefect worker start --pool k8s --type kubernetes

per-stage containers (execution.mode: containers):
  each stage of a run is its own flow run of deployment gptpipe-stage/<stage>, so the
  tokenizer can run on a CPU node and pretraining on 8 GPUs (execution.resources in the recipe):
                gptpipe deploy --stages --pool gpu-docker --pool-type docker --image REGISTRY/gptpipe:TAG
                gptpipe run --config configs/tiny.yaml --set execution.mode=containers \
                    --set artifacts.store=s3://BUCKET/store

The server is the one PREFECT_API_URL names (e.g. after `gptpipe services up`). Runs read
MLFLOW_TRACKING_URI and S3 settings from the worker's environment, or from --env KEY=VALUE.
The same deployments, declaratively: prefect.yaml (`prefect deploy --all`).
"""


def add_deploy_command(sub: Any) -> None:
    import argparse

    parser = sub.add_parser(
        "deploy",
        help="create a scheduled Prefect deployment of the pipeline on a work pool",
        description="Create (or update) a Prefect deployment of the gptpipe flow with a cron schedule.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", default=DeploySpec.name, help="deployment name (default: %(default)s)")
    parser.add_argument("--pool", default=DeploySpec.pool, help="work pool, created if missing (default: %(default)s)")
    parser.add_argument(
        "--pool-type", default="process", choices=POOL_TYPES, help="type of a new pool (default: process)"
    )
    parser.add_argument(
        "--cron", default=DeploySpec.cron, help='cron schedule (default: "%(default)s"); "" = no schedule'
    )
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: UTC)")
    parser.add_argument("--config", "-c", default=DeploySpec.config_path, help="recipe YAML, relative to the project")
    add_override_argument(parser, help="recipe override passed to every run (repeatable)")
    parser.add_argument("--force", action="store_true", help="runs recompute every stage")
    parser.add_argument("--image", default=None, help="container image for docker/kubernetes pools")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for each run, e.g. MLFLOW_TRACKING_URI=http://… (repeatable)",
    )
    parser.add_argument("--paused", action="store_true", help="create the schedule paused")
    parser.add_argument(
        "--concurrency-limit",
        type=int,
        default=DeploySpec.concurrency_limit,
        help="at most this many runs of the deployment at once; 0 = no limit (default: %(default)s, so a "
        "schedule that fires while the last run is still going does not start a second one)",
    )
    parser.add_argument(
        "--collision-strategy",
        choices=["enqueue", "cancel"],
        default=DeploySpec.collision_strategy,
        help="a run due while the limit is reached: wait for a slot (enqueue) or be cancelled (default: %(default)s)",
    )
    parser.add_argument(
        "--stages",
        nargs="?",
        const="all",
        default=None,
        metavar="LIST",
        help="instead of the pipeline, deploy the per-stage flow once per stage (gptpipe-stage/<stage>) "
        "for recipes with execution.mode=containers; LIST = comma-separated stages (default: all)",
    )
    parser.set_defaults(func=cmd_deploy)


def cmd_deploy(args: Any) -> int:
    import json

    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if args.stages:
        return deploy_stage_flows(args, env)
    spec = DeploySpec(
        name=args.name,
        pool=args.pool,
        pool_type=args.pool_type,
        cron=args.cron or None,
        timezone=args.timezone,
        config_path=args.config,
        overrides=args.overrides,
        force=args.force,
        image=args.image,
        env=env,
        paused=args.paused,
        concurrency_limit=args.concurrency_limit or None,
        collision_strategy=args.collision_strategy,
    )
    result = deploy(spec)
    print(json.dumps(result, indent=2))
    print(
        f"start a worker: prefect worker start --pool {spec.pool}"
        + ("" if spec.pool_type == "process" else f" --type {spec.pool_type}")
    )
    return 0


def deploy_stage_flows(args: Any, env: dict[str, str]) -> int:
    """``gptpipe deploy --stages``: one deployment per stage, for ``execution.mode: containers``."""
    import json

    from flows.containers import deploy_stages
    from stages.registry import ORDER

    wanted = list(ORDER) if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ORDER]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(ORDER)}")
    require_image(args.pool_type, args.image)
    pool_of_type(args.pool, args.pool_type)
    try:
        names = deploy_stages(args.pool, args.image, {**RUN_ENV, **env}, wanted)
    except Exception as exc:
        raise GptpipeError(f"deploy stage flows to pool {args.pool!r}: {str(exc).splitlines()[0]}") from None
    print(json.dumps({"deployments": names, "pool": args.pool, "image": args.image}, indent=2))
    print(
        f"start a worker: prefect worker start --pool {args.pool} --type {args.pool_type}; then run a recipe with "
        "--set execution.mode=containers"
    )
    return 0
