"""``gptpipe`` command line: run the pipeline, run one stage, inspect a recipe, generate text.

Prefect is imported only by the commands that need it, after the environment defaults are
set, so ``gptpipe --help`` and ``gptpipe config`` answer instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from flows import mlflow_links
from flows.process_env import EMBEDDED_ENV
from stages.core.config import add_override_argument
from stages.core.errors import GptpipeError
from stages.core.progress import quiet_library_bars

DEFAULT_RECIPE = "configs/tiny.yaml"


def prepare_environment() -> None:
    """Embedded-mode defaults: Prefect state under the project, and ``flows.process_env.EMBEDDED_ENV``
    (no telemetry, stage logs forwarded, CPU threads that sleep rather than spin while they wait)."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    for name, value in EMBEDDED_ENV.items():  # before anything imports prefect, mlflow or torch
        os.environ.setdefault(name, value)
    quiet_library_bars()  # in a log file, MLflow's and transformers' bars would be carriage-return frames


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_RECIPE, help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    add_override_argument(parser, help="override a recipe field, e.g. --set pretrain.max_steps=50 (repeatable)")


class Stopped(BaseException):
    """SIGTERM to ``gptpipe run`` outside a training step (a BaseException: no ``except Exception`` on
    the way may swallow it). A training stage catches SIGTERM itself: it checkpoints and fails with
    ``Preempted``, which says where it stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_run(signum: int, frame: object) -> None:
    from stages.training.preemption import request_stop

    request_stop(signal.Signals(signum).name)  # nothing in this process retries a stage from now on
    raise Stopped(signum)


def cmd_run(args: argparse.Namespace) -> int:
    # A container platform stops its main process with SIGTERM. While a flow runs Prefect's handler
    # holds it and hands it back here once the flow run is marked crashed; during training the stage's
    # guard holds it (it checkpoints, and the run fails with the line saying so).
    previous = signal.signal(signal.SIGTERM, _stop_run)
    try:
        return _run_pipeline(args)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run_pipeline(args: argparse.Namespace) -> int:
    from stages.core.config import load_config
    from stages.core.tracking import check_reachable

    if args.continue_from:  # the same as --set continue_from=VALUE
        args.overrides = [*args.overrides, f"continue_from={args.continue_from}"]
    cfg = load_config(args.config, args.overrides)  # fail on a bad recipe before Prefect starts
    if not args.no_track:  # ...and on a tracking server that does not answer (the default SQLite needs none)
        check_reachable(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or "")
    from flows.embedded import prepare_prefect
    from flows.pipeline import pipeline
    from flows.report import render_report

    prepare_prefect()  # several runs may share this machine's embedded Prefect database

    report = pipeline(
        config_path=args.config,
        overrides=args.overrides,
        force=args.force,
        track=not args.no_track,
        parent_run_id=args.parent_run_id,
    )
    print(render_report(report))
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from stages.core.config import load_config

    if args.reference:
        from flows.cli.recipe_reference import reference_markdown

        print(reference_markdown(), end="")
        return 0

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from stages.__main__ import main as stage_main

    return stage_main(args.rest, prog="gptpipe stage")


def _experiment_id(uri: str, name: str) -> str | None:
    """The experiment's id in the tracking store, None before the first run made it."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    return found.experiment_id if found else None


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.pipeline import tracking_uri
    from stages.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg)
    command = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    print(" ".join(command), file=sys.stderr)
    local = mlflow_links.local_ui(args.port)
    page = mlflow_links.experiment_url(uri, _experiment_id(uri, cfg.tracking.experiment), base=local)
    print(f"the recipe's runs: {page or local} (once the server is up)", file=sys.stderr)
    os.execvp(command[0], command)
    return 0  # not reached


def cmd_services(args: argparse.Namespace) -> int:
    from flows.cli import services

    if args.action == "up":
        ports = {"s3": args.s3_port, "mlflow": args.mlflow_port, "prefect": args.prefect_port}
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = sorted(set(names) - set(services.START_ORDER))
        if unknown:
            raise GptpipeError(f"--only {args.only!r}: unknown service(s) {unknown}; choose from s3, mlflow, prefect")
        layout = services.up(args.home, ports, args.bucket, timeout=args.timeout, names=names)
        urls = {
            "prefect": layout.prefect_url,
            "mlflow": layout.mlflow_url,
            "s3": f"{layout.s3_url} (bucket {layout.bucket})",
        }
        for name in layout.names:
            print(f"{name:8} {urls[name]}")
        print(f"logs     {layout.home / 'logs'}")
        print(
            f"use them: source {layout.home / 'env.sh'}\n"
            f"then:     gptpipe run --set artifacts.store=s3://{layout.bucket}/store"
        )
        return 0
    if args.action == "down":
        stopped = services.down(args.home)
        print("services stopped" if stopped else f"no services running under {args.home}")
        return 0
    report = services.status(args.home)
    if not report:
        print(f"no services running under {args.home} (start them with: gptpipe services up)")
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sup = report.pop("supervisor")
        print(f"supervisor pid {sup['pid']}: {'running' if sup['running'] else 'stopped'}")
        for name, info in report.items():
            state = "healthy" if info["healthy"] else ("running, not answering" if info["running"] else "down")
            print(f"{name:8} port {info['port']:<6} pid {info['pid']}  {state}")
    return 0 if all(info.get("healthy", True) for info in report.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptpipe",
        description="Train a GPT from a text corpus: tokenizer -> shards -> pretrain -> fine-tune -> evaluate "
        "-> ONNX export -> Netron bundle, as a Prefect flow tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (reuses finished stages by content key)")
    _recipe_args(run)
    run.add_argument(
        "--force",
        action="store_true",
        help="recompute every stage even if a finished output exists (a finished output is never replaced: "
        "the recomputed copy is dropped; delete a store directory to rebuild it)",
    )
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    run.add_argument(
        "--continue-from",
        metavar="FROM",
        help="continue from an earlier model: champion, a registered version number, or the store URI of a "
        "pretrain or finetune output (same as --set continue_from=FROM)",
    )
    run.add_argument("--report-json", metavar="PATH", help="also write the report card as JSON to PATH")
    run.add_argument(
        "--parent-run-id", default=None, help="nest the pipeline's MLflow run under this run (what a sweep does)"
    )
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="validate a recipe and print it fully resolved")
    _recipe_args(config)
    config.add_argument("--reference", action="store_true", help="print every recipe key with its default and meaning")
    config.set_defaults(func=cmd_config)

    stage = sub.add_parser("stage", help="run one stage alone (same as `python -m stages NAME ...`)", add_help=False)
    stage.add_argument("rest", nargs=argparse.REMAINDER)
    stage.set_defaults(func=cmd_stage)

    ui = sub.add_parser("ui", help="start the MLflow UI on this recipe's tracking store (127.0.0.1)")
    _recipe_args(ui)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    svc = sub.add_parser(
        "services",
        help="start/stop local Prefect + MLflow + S3 (moto) servers on 127.0.0.1",
        description="Local shared services without Docker, supervised in the background, data under --home. "
        "`up` prints what to `source` so gptpipe uses them.",
    )
    svc.add_argument("action", choices=["up", "down", "status"])
    svc.add_argument(
        "--home", default="runs/services", help="directory holding their data and logs (default: %(default)s)"
    )
    svc.add_argument("--prefect-port", type=int, default=4200, help="0 = any free port (default: %(default)s)")
    svc.add_argument("--mlflow-port", type=int, default=5000, help="0 = any free port (default: %(default)s)")
    svc.add_argument("--s3-port", type=int, default=9000, help="0 = any free port (default: %(default)s)")
    svc.add_argument("--bucket", default="gptpipe", help="bucket created for artifacts (default: %(default)s)")
    svc.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health (default: %(default)s)")
    svc.add_argument("--only", default="s3,mlflow,prefect", help="services to start (default: all three)")
    svc.add_argument("--json", action="store_true", help="status as JSON")
    svc.set_defaults(func=cmd_services)

    from flows.deploy import add_deploy_command

    add_deploy_command(sub)

    from flows.cli.generate import add_generate_command

    add_generate_command(sub)

    from flows.cli.eval import add_eval_command

    add_eval_command(sub)

    from flows.cli.sweep import add_sweep_command

    add_sweep_command(sub)

    from flows.cli.plan import add_plan_command

    add_plan_command(sub, _recipe_args)

    from flows.cli.promote import add_promote_commands

    add_promote_commands(sub, _recipe_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_environment()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stage"]:  # everything after it is the stage's own command line, --help included
        args = argparse.Namespace(func=cmd_stage, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptpipe: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        print(
            f"gptpipe: stopped by {name}; finished stages are kept: rerun the same command to continue", file=sys.stderr
        )
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
