"""``gptpipe`` command line: run the pipeline, run one stage, inspect a recipe, generate text.

Prefect is imported only by the commands that need it, after the environment defaults are
set, so ``gptpipe --help`` and ``gptpipe config`` answer instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stages.errors import GptpipeError

DEFAULT_RECIPE = "configs/tiny.yaml"


def prepare_environment() -> None:
    """Embedded-mode defaults: Prefect state under the project, no telemetry, stage logs forwarded."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gptpipe")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_RECIPE, help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set pretrain.max_steps=50 (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    from stages.config import load_config

    load_config(args.config, args.overrides)  # fail on a bad recipe before Prefect starts
    from flows.pipeline import pipeline
    from flows.report import render_report

    report = pipeline(config_path=args.config, overrides=args.overrides, force=args.force, track=not args.no_track)
    print(render_report(report))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from stages.config import load_config

    if args.reference:
        from flows.recipe_reference import reference_markdown

        print(reference_markdown(), end="")
        return 0

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from stages.__main__ import main as stage_main

    return stage_main(args.rest)


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.pipeline import tracking_uri
    from stages.config import load_config

    uri = tracking_uri(load_config(args.config, args.overrides))
    command = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    print(" ".join(command), file=sys.stderr)
    os.execvp(command[0], command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptpipe",
        description="Train a GPT from a text corpus: tokenizer -> shards -> pretrain -> fine-tune -> evaluate "
        "-> ONNX export -> Netron bundle, as a Prefect flow tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (reuses finished stages by content key)")
    _recipe_args(run)
    run.add_argument("--force", action="store_true", help="recompute every stage even if a finished output exists")
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
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

    from flows.generate_cli import add_generate_command

    add_generate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
