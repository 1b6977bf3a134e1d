"""Bits per byte on a fixed text, whatever the model's tokenizer.

A held-out set that outlives one tokenizer is text, not tokens. ``text_set`` takes the front of a
token split (documents back to back, each followed by EOS) and decodes it into documents;
``bits_per_byte`` scores a model on those documents encoded with the model's own tokenizer: the
summed next-token loss over every token of the text, in nats, / ln 2 / the UTF-8 bytes of the same
text. The bytes do not depend on the tokenizer, so models with different vocabularies compare.

The set is deterministic: the first ``max_tokens`` tokens of the split, as whole documents; the
document the bound cuts keeps its lines up to its last newline inside the bound (none: dropped).
``"\\n"`` is always its own id in a gptpipe tokenizer, so the cut is a clean token boundary.

Each document is scored after one EOS (the separator the data stage writes before every document
but the first, so a model sees a document start as in training), in windows of the model's
``block_size``: each window predicts up to ``block_size`` tokens from the tokens before them in the
same window, as lm-evaluation-harness's rolling log-likelihood does. The EOS after a document is
not scored: it is not text.

When the model's tokenizer is the split's (the same SentencePiece proto), the split's tokens are
scored as they are; otherwise the text is encoded again. gptpipe tokenizers use the identity
normalization, no dummy prefix and byte fallback, and the tokenizer stage checks that decoding gives
every document back byte for byte, so the two paths give the same ids. A tokenizer that normalizes
(NFKC, squeezed whitespace) would score the normalized text against the bytes of the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.core.errors import DataError

if TYPE_CHECKING:
    from stages.lm.model import GPT
    from stages.lm.tokenizer import Tokenizer
    from stages.storage.shards import TokenShards


@dataclass(frozen=True)
class TextSet:
    """Documents of held-out text, with their ids under the tokenizer the split was made with."""

    texts: list[str]
    ids: list[list[int]]
    proto: bytes  # that tokenizer's SentencePiece model

    @property
    def num_bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.texts)

    def ids_for(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The documents as ``tokenizer`` encodes them: the split's own ids when it made them."""
        if tokenizer.model_proto == self.proto:
            return self.ids
        return tokenizer.encode_batch(self.texts)

    def describe(self) -> dict[str, int]:
        """Its size, for a report: documents, UTF-8 bytes and tokens of the split it came from."""
        return {"documents": len(self.texts), "bytes": self.num_bytes, "tokens": sum(len(d) for d in self.ids)}


def text_set(shards: TokenShards, tokenizer: Tokenizer, max_tokens: int) -> TextSet:
    """The first ``max_tokens`` of ``shards`` (made with ``tokenizer``) as whole documents, the cut one
    kept up to its last newline within the bound."""
    ids = [int(t) for t in shards.window(0, min(max_tokens, len(shards)))]
    documents, start = [], 0
    for at, token in enumerate(ids):
        if token == shards.eos_id:
            documents.append(ids[start:at])
            start = at + 1
    tail = ids[start:]
    if tokenizer.newline_id in tail:  # a document the bound cuts: its whole lines
        documents.append(tail[: len(tail) - tail[::-1].index(tokenizer.newline_id)])
    kept = [(tokenizer.decode(doc, keep_special=True), doc) for doc in documents]
    kept = [(text, doc) for text, doc in kept if text]
    if not kept:
        raise DataError(
            f"split {shards.split!r}: no whole line of text in its first {len(ids)} tokens; "
            "raise evaluate.val_batches or evaluate.batch_size"
        )
    return TextSet([text for text, _ in kept], [doc for _, doc in kept], tokenizer.model_proto)


def _windows(documents: list[list[int]], eos_id: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of at most ``block_size``: each document after one EOS, every token a target once."""
    windows = []
    for ids in documents:
        sequence = [eos_id, *ids]
        for start in range(0, len(ids), block_size):
            targets = sequence[start + 1 : start + 1 + block_size]
            windows.append((sequence[start : start + len(targets)], targets))
    return windows


def bits_per_byte(model: GPT, documents: list[list[int]], num_bytes: int, eos_id: int, batch_size: int) -> float:
    """``model``'s summed next-token loss over ``documents`` (ids of its own tokenizer), in bits per byte
    of their text (``num_bytes``, UTF-8)."""
    import torch

    from stages.lm.targets import IGNORE
    from stages.training.loss import evaluate_loss

    windows = sorted(_windows(documents, eos_id, model.cfg.block_size), key=lambda w: -len(w[1]))
    if not windows or num_bytes <= 0:
        raise DataError("bits per byte of an empty text: the held-out set holds no tokens")
    batches = []
    for at in range(0, len(windows), batch_size):
        group = windows[at : at + batch_size]
        width = len(group[0][1])  # the longest: windows are sorted by length
        x = torch.full((len(group), width), eos_id, dtype=torch.long)
        y = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, (inputs, targets) in enumerate(group):
            x[row, : len(inputs)] = torch.tensor(inputs)
            y[row, : len(targets)] = torch.tensor(targets)
        batches.append((x, y))
    scored = sum(len(targets) for _, targets in windows)
    return evaluate_loss(model, batches) * scored / math.log(2) / num_bytes
