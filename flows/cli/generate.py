"""``gptpipe generate``: talk to a trained model from the terminal (PyTorch, the export's served runtime,
or the registered MLflow model by alias: ``models:/<name>@champion``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import registry
from stages.core.config import add_override_argument
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


def registered_reply(args: argparse.Namespace) -> str:
    """``--registered ALIAS``: what ``mlflow.pyfunc.load_model("models:/<name>@ALIAS")`` answers (the
    recipe names the tracking store and the model, as for ``gptpipe run``)."""
    import sys

    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from flows.pipeline import registered_model_name, tracking_uri
    from stages.core.config import load_config
    from stages.core.tracking import check_reachable, redact_uri
    from stages.serving.model_registry import champion

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    name = registered_model_name(cfg)
    version = champion(MlflowClient(tracking_uri=uri), name, args.registered)
    if version is None:
        raise ArtifactError(
            f"models:/{name}@{args.registered}: no version holds alias {args.registered!r} at {redact_uri(uri)}; "
            "run the pipeline, or move it with `gptpipe promote VERSION`"
        )
    model_uri = f"models:/{name}@{args.registered}"
    print(f"[{model_uri} = version {version.version}, the registered MLflow model]", file=sys.stderr)
    mlflow.set_tracking_uri(uri)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k or 0}
    if args.seed is not None:
        params["seed"] = args.seed
    return str(mlflow.pyfunc.load_model(model_uri).predict(args.prompt, params=params)[0])


def cmd_generate(args: argparse.Namespace) -> int:
    store = Path(args.store)
    if args.registered is not None:
        print(registered_reply(args))
        return 0
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
    gen.add_argument(
        "--registered",
        nargs="?",
        const="champion",
        default=None,
        metavar="ALIAS",
        help="load the registered MLflow model models:/<name>@ALIAS (default alias: champion; or challenger) "
        "from the recipe's tracking store, as mlflow.pyfunc.load_model does",
    )
    gen.add_argument(
        "--config",
        "-c",
        default="configs/tiny.yaml",
        help="with --registered: the recipe naming the tracking store and model (default: %(default)s)",
    )
    add_override_argument(gen, help="with --registered: override a recipe field, e.g. --set tracking.uri=...")
    gen.add_argument("--store", default="runs/store", help="local artifact store (default: runs/store)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
