"""``gptpipe generate``: talk to a trained model from the terminal (PyTorch or ONNX Runtime)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import registry
from stages.core.errors import ArtifactError
from stages.storage.artifacts import read_manifest


def newest_artifact(store: Path, stage: str) -> Path:
    """The most recently finished output of ``stage`` in a local store."""
    candidates = [p for p in (store / stage).glob("*") if (p / "manifest.json").is_file()]
    if not candidates:
        raise ArtifactError(f"{store / stage}: no finished '{stage}' output; run `make run` first or pass --model")
    return max(candidates, key=lambda p: (p / "manifest.json").stat().st_mtime)


def tokenizer_dir_for(model_dir: Path) -> Path:
    """The tokenizer artifact a model artifact was trained with (recorded in its manifest)."""
    manifest = read_manifest(model_dir)
    if "tokenizer" not in manifest.inputs:
        raise ArtifactError(f"{model_dir}: manifest records no tokenizer input; pass --tokenizer DIR")
    return Path(manifest.inputs["tokenizer"]["uri"])


def cmd_generate(args: argparse.Namespace) -> int:
    store = Path(args.store)
    if args.onnx is not None:
        import sys

        from stages.formats.served import open_served, served_runtime

        export_dir = Path(args.onnx) if args.onnx != "latest" else newest_artifact(store, "export")
        print(f"[{served_runtime(export_dir)}: the runtime the export certified as fastest]", file=sys.stderr)
        text = open_served(export_dir).generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        print(text)
        return 0

    from stages.lm.generate import Sampling, generate
    from stages.lm.tokenizer import Tokenizer
    from stages.training.checkpoint_format import load_model, model_directory

    model_dir = Path(args.model) if args.model else newest_artifact(store, args.stage)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else tokenizer_dir_for(model_dir)
    model = load_model(model_directory(model_dir), device="cpu")
    tokenizer = Tokenizer.load(tokenizer_dir)
    text = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
    )
    print(text)
    return 0


def model_stage(name: str) -> str:
    """``--stage``: a stage that makes a model (read from the registry only when the flag is parsed,
    so ``gptpipe --help`` does not import every stage)."""
    makers = registry.model_stages()
    if name not in makers:
        raise argparse.ArgumentTypeError(f"{name!r} makes no model; choose from {', '.join(makers)}")
    return name


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate a reply from a trained model (chat template applied)")
    gen.add_argument("--prompt", "-p", required=True, help="the user message")
    gen.add_argument("--model", help="pretrain/finetune artifact directory (default: newest in the store)")
    gen.add_argument(
        "--stage",
        default="finetune",
        type=model_stage,
        help="which stage's newest output to use when --model is not given",
    )
    gen.add_argument("--tokenizer", help="tokenizer artifact (default: the one recorded in the model's manifest)")
    gen.add_argument(
        "--onnx",
        nargs="?",
        const="latest",
        default=None,
        help="use the served runtime of an export artifact (the one its certificate timed fastest: onnxruntime-genai or ONNX Runtime) instead of PyTorch (default: newest export)",
    )
    gen.add_argument("--store", default="runs/store", help="local artifact store (default: runs/store)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
