"""``python -m stages NAME``: run one stage alone, through the same executor as every other way.

    python -m stages pretrain --config configs/tiny.yaml \\
        --input tokenizer=runs/store/tokenizer/<key> --input data=runs/store/data/<key> \\
        --out runs/store

The output lands in ``<out>/<stage>/<content key>/``; its reference is printed as JSON on
stdout, so a launcher can hand it to the next stage. With ``--tracking-uri`` and
``--parent-run-id`` the stage opens (and closes) its MLflow child run under that parent.
A stage whose recipe section asks for several processes runs under ``torchrun`` by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from stages.core.cpu_threads import wait_passively
from stages.core.errors import GptpipeError
from stages.registry import ORDER

# The recipe schema, the executor and the stores are imported inside the functions: a data stage's
# worker processes start by 'spawn', which runs this module's top level again in every worker (as
# __mp_main__), and a worker needs none of them, only what its task unpickles.


def parse_args(argv: list[str] | None, prog: str = "python -m stages") -> argparse.Namespace:
    from stages.core.config import add_override_argument

    parser = argparse.ArgumentParser(prog=prog, description="Run one gptpipe stage.")
    parser.add_argument("stage", choices=ORDER, help="stage to run")
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute even if a finished output exists (which is kept: finished outputs are never replaced)",
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for a child run")
    parser.add_argument(
        "--parent-run-id", default=None, help="open a child run under this MLflow run (with --tracking-uri)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m stages") -> int:
    wait_passively()  # before the imports below load torch
    from stages.core.config import load_config
    from stages.core.progress import quiet_library_bars
    from stages.executor import execute
    from stages.stage_call import StageCall
    from stages.storage.stores import ref_from_path

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    quiet_library_bars()  # a container's log is not a terminal
    args = parse_args(argv, prog)
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
        call = StageCall.for_recipe(
            args.stage,
            cfg,
            inputs,
            tracking_uri=args.tracking_uri,
            parent_run_id=args.parent_run_id,
            force=args.force,
        )
        result = execute(call)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**result.ref.to_dict(), "reused": result.reused, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
