"""``gptpipe eval --tasks …``: lm-evaluation-harness tasks on any finished gptpipe checkpoint.

The checkpoint is a pretrain or finetune artifact (default: the newest finetune in the store).
``gptpipe_heldout`` and ``gptpipe_bpb`` are local tasks written on the fly — from the
artifact's ``heldout.jsonl`` (or the built-in held-out tasks) and from the validation split of
the data artifact its manifest records (or ``--text`` files). Any other name is a harness task:
installed ones need their datasets reachable or cached (nothing here downloads), and ``--include``
adds a folder of your own task YAML files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flows.cli.generate import model_stage, newest_artifact, tokenizer_dir_for
from stages.core.errors import ArtifactError, GptpipeError


def _heldout_records(model_dir: Path, count: int) -> list[dict]:
    from stages.lm.tasks import make_items
    from stages.training.checkpoint_format import HELDOUT

    path = model_dir / HELDOUT
    if path.is_file():
        from stages.evaluate import read_heldout

        return read_heldout(path)[:count]
    return [{"messages": item.messages(), "task": item.task} for item in make_items(count, "heldout", 0)]


def _texts(model_dir: Path, files: list[str], tokenizer, max_tokens: int) -> list[str]:
    if files:
        return [Path(name).read_text(encoding="utf-8") for name in files]
    from stages.lm.harness import validation_texts
    from stages.storage.artifacts import read_manifest
    from stages.storage.shards import TokenShards

    for source in (model_dir, *[Path(ref["uri"]) for ref in read_manifest(model_dir).inputs.values()]):
        inputs = read_manifest(source).inputs if (source / "manifest.json").is_file() else {}
        if "data" in inputs:
            return validation_texts(TokenShards(Path(inputs["data"]["uri"]), "val"), tokenizer, max_tokens)
    raise ArtifactError(f"{model_dir}: no data artifact recorded in its manifests for gptpipe_bpb; pass --text FILE")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GptpipeError("gptpipe eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13'") from None
    from stages.lm import harness
    from stages.lm.tokenizer import Tokenizer
    from stages.training.checkpoint_format import load_model, model_directory

    model_dir = Path(args.model) if args.model else newest_artifact(Path(args.store), args.stage)
    tokenizer = Tokenizer.load(Path(args.tokenizer) if args.tokenizer else tokenizer_dir_for(model_dir))
    model = load_model(model_directory(model_dir), device="cpu").eval()
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="gptpipe-eval-") as scratch:
        include = Path(args.include) if args.include else None
        if set(tasks) & set(harness.LOCAL_TASKS):
            records = _heldout_records(model_dir, args.items) if harness.HELDOUT_TASK in tasks else []
            texts = _texts(model_dir, args.text, tokenizer, args.bpb_tokens) if harness.BPB_TASK in tasks else []
            local = harness.write_local_tasks(Path(scratch) / "tasks", records, texts, args.max_new_tokens)
            if include is not None:  # the harness takes one include folder: put the user's beside ours
                for path in include.glob("*"):
                    (local / path.name).symlink_to(path.resolve())
            include = local
        results = harness.run_tasks(model, tokenizer, tasks, include, limit=args.limit, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": str(model_dir), "results": results}, indent=2))
        return 0
    print(f"lm-evaluation-harness on {model_dir}")
    for task, figures in results.items():
        print(f"  {task}: " + ", ".join(f"{key}={value:.4f}" for key, value in figures.items()))
    return 0


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a finished checkpoint")
    ev.add_argument("--tasks", required=True, help="comma-separated harness tasks, e.g. gptpipe_heldout,gptpipe_bpb")
    ev.add_argument("--model", help="pretrain/finetune artifact directory (default: newest in the store)")
    ev.add_argument("--stage", default="finetune", type=model_stage, help="a stage that makes a model")
    ev.add_argument("--tokenizer", help="tokenizer artifact (default: the one recorded in the model's manifest)")
    ev.add_argument("--store", default="runs/store", help="local artifact store (default: runs/store)")
    ev.add_argument("--include", help="a folder of your own harness task YAML files")
    ev.add_argument("--text", action="append", default=[], help="text file(s) for gptpipe_bpb (repeatable)")
    ev.add_argument("--items", type=int, default=300, help="held-out items for gptpipe_heldout (default: 300)")
    ev.add_argument("--bpb-tokens", type=int, default=20480, help="validation tokens for gptpipe_bpb")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=cmd_eval)
