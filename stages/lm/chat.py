"""Chat data: the JSONL format, its validation, and the ONE chat template.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages. On disk it is JSONL, one conversation per line, either
``{"messages": [...]}`` or the short form ``{"prompt": "...", "response": "..."}``.

The template renders every message as ``<|role|>`` + content + ``<|end|>``::

    <|system|>Be brief.<|end|><|user|>Reverse: a b c<|end|><|assistant|>c b a<|end|>

and the loss mask marks exactly the assistant contents and their ``<|end|>`` (the model must
learn to stop); role markers, system and user text are context only. ``render_prompt`` renders
the conversation so far followed by ``<|assistant|>``: generation continues from there and
stops at ``<|end|>``. Training, evaluation, generation and the ONNX demo all go through
``ChatTemplate`` so the formats cannot drift apart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stages.core.errors import DataError
from stages.lm.targets import IGNORE

log = logging.getLogger("gptpipe.chat")

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"

Message = dict[str, str]


class ChatTokenizer(Protocol):
    """What the template needs from ``stages.lm.tokenizer.Tokenizer``."""

    special: dict[str, int]
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Rendered:
    """Token ids of one conversation and, per id, whether the model is trained to produce it."""

    ids: list[int]
    mask: list[bool]

    def inputs_targets(self) -> tuple[list[int], list[int]]:
        """Next-token pairs: inputs ``ids[:-1]``, targets ``ids[1:]`` with untrained positions = -100."""
        targets = [tok if keep else IGNORE for tok, keep in zip(self.ids[1:], self.mask[1:])]
        return self.ids[:-1], targets


def validate_messages(record: Any, where: str) -> list[Message]:
    """Turn one parsed JSON record into a message list, or raise DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"{where}: needs a 'messages' list or 'prompt' and 'response' fields (keys: {sorted(record)})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    clean: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {i} is {type(message).__name__}, expected an object with role and content"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: no assistant message, so there is nothing to train on")
    return clean


def read_chat_jsonl(path: str | Path, max_bad_fraction: float = 0.0) -> list[list[Message]]:
    """Read a chat JSONL file; malformed lines are reported as ``file:line: why``.

    Blank lines are skipped. If the share of bad lines exceeds ``max_bad_fraction``, or no
    line is usable, the whole file is refused: training on a silently shrunken set hides bugs.
    """
    path = Path(path)
    try:
        # Split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON
        # allows unescaped inside strings (json.dumps(..., ensure_ascii=False) writes them so).
        lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except FileNotFoundError:
        raise DataError(
            f"{path}: chat data file not found (set finetune.data to a JSONL file or 'synthetic')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read chat data: {exc}") from None
    good: list[list[Message]] = []
    bad: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except (ValueError, RecursionError) as exc:  # an integer too long to parse, nesting too deep
            bad.append(f"{where}: not usable JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        try:
            good.append(validate_messages(record, where))
        except DataError as exc:
            bad.append(str(exc))
    for problem in bad:
        log.warning("skipping malformed chat line: %s", problem)
    total = len(good) + len(bad)
    if total == 0:
        raise DataError(f"{path}: no conversations (the file is empty); expected one JSON object per line")
    if not good:
        raise DataError(f"{path}: all {total} lines are malformed; first: {bad[0]}")
    if len(bad) / total > max_bad_fraction:
        raise DataError(
            f"{path}: {len(bad)} of {total} lines are malformed (more than finetune.max_bad_fraction="
            f"{max_bad_fraction}); first: {bad[0]}"
        )
    return good


class ChatTemplate:
    """Renders conversations to token ids with the tokenizer's special tokens."""

    def __init__(self, tokenizer: ChatTokenizer):
        missing = [t for t in (*ROLE_TOKENS.values(), END_TOKEN) if t not in tokenizer.special]
        if missing:
            raise DataError(
                f"tokenizer lacks chat special token(s) {', '.join(missing)}; retrain the tokenizer stage with them"
            )
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = tokenizer.special[END_TOKEN]
        # Generation stops at <|end|>; EOS too, in case a base model ends a "document" instead.
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.end_id, tokenizer.eos_id) if i is not None and i >= 0))

    def render(self, messages: list[Message]) -> Rendered:
        """Ids of a whole conversation plus the loss mask (assistant content + its <|end|>)."""
        ids: list[int] = []
        mask: list[bool] = []
        for message in messages:
            trained = message["role"] == "assistant"
            content = self.tokenizer.encode(message["content"]) if message["content"] else []
            ids.append(self.role_ids[message["role"]])
            mask.append(False)
            ids.extend(content)
            mask.extend([trained] * len(content))
            ids.append(self.end_id)
            mask.append(trained)
        return Rendered(ids, mask)

    def render_prompt(self, messages: list[Message]) -> list[int]:
        """Ids of the conversation so far followed by ``<|assistant|>``, ready for generation."""
        return self.render(messages).ids + [self.role_ids["assistant"]]

    def split_last_answer(self, messages: list[Message]) -> tuple[list[Message], str]:
        """(messages before the final assistant turn, that turn's text): a scoring item."""
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError("conversation does not end with an assistant message; cannot score it")
        return messages[:-1], messages[-1]["content"]

    def decode_answer(self, ids: list[int]) -> str:
        """Text of generated ids, cut at the first stop id."""
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(list(ids))
