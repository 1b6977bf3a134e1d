"""``python -m stages NAME``: run one stage alone, exactly as a container runs it.

    python -m stages pretrain --config configs/tiny.yaml \\
        --input tokenizer=runs/store/tokenizer/<key> --input data=runs/store/data/<key> \\
        --out runs/store

The output lands in ``<out>/<stage>/<content key>/``; its reference is printed as JSON on
stdout, so a launcher can hand it to the next stage. With ``--tracking-uri`` and
``--parent-run-id`` the stage opens (and closes) its MLflow child run under that parent; with
``--run-id`` instead it logs into that existing stage run, which its caller closes (how
``flows/launch.py`` runs a stage under torchrun: rank 0 writes into the flow's stage run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

from stages.core.config import add_override_argument, load_config
from stages.core.errors import GptpipeError
from stages.core.progress import quiet_library_bars
from stages.registry import STAGE_ORDER
from stages.runner import run_stage, stage_config
from stages.storage.stores import open_store, ref_from_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages", description="Run one gptpipe stage.")
    parser.add_argument("stage", choices=STAGE_ORDER, help="stage to run")
    parser.add_argument("--config", "-c", default=None, help="recipe YAML (default: built-in defaults)")
    add_override_argument(parser, help="override a recipe field (repeatable)")
    parser.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="an upstream artifact, e.g. tokenizer=runs/store/tokenizer/<key> (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="artifact store to write into (default: the recipe's artifacts.store)"
    )
    parser.add_argument("--force", action="store_true", help="recompute even if a finished output exists")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for a child run")
    run = parser.add_mutually_exclusive_group()
    run.add_argument(
        "--parent-run-id", default=None, help="open a child run under this MLflow run (with --tracking-uri)"
    )
    run.add_argument(
        "--run-id",
        default=None,
        help="log into this existing MLflow stage run, which the caller closes (with --tracking-uri)",
    )
    return parser.parse_args(argv)


def tracking(args: argparse.Namespace, cfg: Any) -> Any:
    """The stage's MLflow run as a context manager (``None`` inside when untracked); rank 0 alone logs."""
    if not args.tracking_uri or not (args.parent_run_id or args.run_id) or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    from stages.core.tracking import stage_run

    if args.run_id:
        return stage_run(args.tracking_uri, args.stage, run_id=args.run_id)
    return stage_run(
        args.tracking_uri,
        args.stage,
        parent_run_id=args.parent_run_id,
        tags={"gptpipe.recipe": cfg.name},
        params=lambda: stage_config(args.stage, cfg),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    quiet_library_bars()  # a container's log is not a terminal
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.out:
            overrides.append(f"artifacts.store={args.out}")
        cfg = load_config(args.config, overrides)
        inputs = {}
        for item in args.inputs:
            name, sep, uri = item.partition("=")
            if not sep or not uri:
                raise GptpipeError(f"--input {item!r}: expected NAME=URI, e.g. tokenizer=runs/store/tokenizer/<key>")
            inputs[name] = ref_from_path(uri)
        with tracking(args, cfg) as tracker:
            result = run_stage(args.stage, cfg, inputs, open_store(cfg.artifacts.store), tracker, force=args.force)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**result.ref.to_dict(), "reused": result.reused, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
