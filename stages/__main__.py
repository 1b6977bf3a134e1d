"""``python -m stages NAME``: run one stage alone, exactly as a container runs it.

    python -m stages pretrain --config configs/tiny.yaml \\
        --input tokenizer=runs/store/tokenizer/<key> --input data=runs/store/data/<key> \\
        --out runs/store

The output lands in ``<out>/<stage>/<content key>/``; its reference is printed as JSON on
stdout, so a launcher can hand it to the next stage. With ``--tracking-uri`` and
``--parent-run-id`` the stage logs to an MLflow child run under that parent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from stages.core.config import load_config
from stages.core.errors import GptpipeError
from stages.registry import STAGE_ORDER
from stages.runner import run_stage, stage_config
from stages.storage.stores import open_store, ref_from_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages", description="Run one gptpipe stage.")
    parser.add_argument("stage", choices=STAGE_ORDER, help="stage to run")
    parser.add_argument("--config", "-c", default=None, help="recipe YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (repeatable)")
    parser.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=URI",
                        help="an upstream artifact, e.g. tokenizer=runs/store/tokenizer/<key> (repeatable)")
    parser.add_argument("--out", default=None, help="artifact store to write into (default: the recipe's artifacts.store)")
    parser.add_argument("--force", action="store_true", help="recompute even if a finished output exists")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for a child run")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run id (with --tracking-uri)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
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
        tracker = None
        if args.tracking_uri and args.parent_run_id and os.environ.get("RANK", "0") == "0":  # rank 0 logs
            from stages.core.tracking import attach_run

            tracker = attach_run(args.tracking_uri, args.parent_run_id).child(args.stage, {"gptpipe.stage": args.stage})
        try:
            if tracker is not None:  # inside the try: a source that cannot be read must not leave a RUNNING run
                tracker.log_params(stage_config(args.stage, cfg))
            result = run_stage(args.stage, cfg, inputs, open_store(cfg.artifacts.store), tracker, force=args.force)
        except BaseException:
            if tracker is not None:
                tracker.finish(ok=False)
            raise
        if tracker is not None:
            tracker.finish(ok=True)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**result.ref.to_dict(), "reused": result.reused, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
