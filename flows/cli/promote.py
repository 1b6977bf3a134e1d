"""``gptpipe promote VERSION`` / ``gptpipe rollback``: move the registered model's ``champion`` alias by hand.

The pipeline's promotion gate moves ``champion`` on its own (``registry.promote``); these commands are
the person's say: promote a held version after review, or put back the version that was champion
before. Each move records why: in the registered model's ``gptpipe.promotion.history`` tag (``by``
promote or rollback, with the reason) and on the version (``gptpipe.promotion.by`` / ``.at`` /
``.reason``; a version rolled back from gets ``gptpipe.promotion.rolled_back``). The tracking server
and the model name come from the recipe, as for ``gptpipe run`` (``MLFLOW_TRACKING_URI``,
``tracking.uri``, ``tracking.registered_model``), or ``--model``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from stages.core.errors import GptpipeError


def _registry(args: argparse.Namespace) -> tuple[Any, str, str]:
    """(client, model name, shown tracking URI) for the recipe, with a one-line error when unreachable."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import registered_model_name, tracking_uri
    from stages.core.config import load_config
    from stages.core.tracking import check_reachable, redact_uri

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri), args.model or registered_model_name(cfg), redact_uri(uri)


def _known_model(client: Any, name: str, shown: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise GptpipeError(
            f"no registered model {name!r} at {shown}; run the pipeline first, or name it with --model"
        ) from None


def cmd_promote(args: argparse.Namespace) -> int:
    from stages.serving.model_registry import champion, model_version, move_champion

    client, name, shown = _registry(args)
    _known_model(client, name, shown)
    version = str(model_version(client, name, args.version).version)
    held = champion(client, name)
    if held is not None and str(held.version) == version:
        print(f"{name}: version {version} already holds champion; nothing moved")
        return 0
    move_champion(client, name, version, "promote", args.reason)
    was = f"was version {held.version}" if held is not None else "it had none"
    print(f"{name}: champion -> version {version} ({was}); reason: {args.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from stages.serving.model_registry import champion, history, model_version, move_champion
    from stages.serving.promotion import rollback_target

    client, name, shown = _registry(args)
    _known_model(client, name, shown)
    held = champion(client, name)
    if held is None:
        raise GptpipeError(f"{name}: no version holds champion at {shown}; nothing to roll back")
    current = str(held.version)
    target = rollback_target(history(client, name), current)
    if target is None:
        raise GptpipeError(
            f"{name}: version {current} is the first champion in its history; nothing to roll back to "
            "(use gptpipe promote VERSION)"
        )
    model_version(client, name, target)  # deleted since: say so before moving anything
    entry = move_champion(client, name, target, "rollback", args.reason)
    note = f"{entry['at']}: champion back to version {target}: {args.reason}"
    client.set_model_version_tag(name, current, "gptpipe.promotion.rolled_back", note)
    print(f"{name}: champion -> version {target} (rolled back from version {current}); reason: {args.reason}")
    return 0


def _common(parser: argparse.ArgumentParser, default_reason: str) -> None:
    parser.add_argument(
        "--reason", default=default_reason, help="why, recorded in the model's history and on the version"
    )
    parser.add_argument(
        "--model", help="registered model name (default: the recipe's tracking.registered_model, or gptpipe-<name>)"
    )


def add_promote_commands(
    sub: argparse._SubParsersAction, recipe_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """``promote`` and ``rollback``; ``recipe_args`` adds ``--config``/``--set`` as every recipe command has them."""
    promote = sub.add_parser(
        "promote",
        help="move the registered model's champion alias to VERSION (after review)",
        description="Point models:/<name>@champion at VERSION and record why (the model's "
        "gptpipe.promotion.history tag, the version's gptpipe.promotion.* tags). What `gptpipe run`'s "
        "promotion gate held (registry.promote) is promoted this way.",
    )
    promote.add_argument("version", help="the registry version number to make champion")
    _common(promote, "promoted by hand")
    recipe_args(promote)
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser(
        "rollback",
        help="move the champion alias back to the version that held it before",
        description="Point models:/<name>@champion back at the version that held it before the current one "
        "(read from the model's gptpipe.promotion.history; repeated rollbacks walk further back) and record why.",
    )
    _common(rollback, "rolled back by hand")
    recipe_args(rollback)
    rollback.set_defaults(func=cmd_rollback)
