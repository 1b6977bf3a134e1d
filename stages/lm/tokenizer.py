"""The ``Tokenizer``: a trained SentencePiece model plus gptpipe's reserved ids.

Reserved ids (same in every model)::

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>
    4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>   8 "\\n"

BOS/EOS/PAD are control ids: text never produces them. The chat markers are user-defined, so
the literal string ``<|user|>`` in a chat transcript encodes as exactly one id. The model is
trained and written by ``stages/lm/tokenizer_training.py``, which the stage ``stages/tokenizer.py`` runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from stages.core.errors import ArtifactError

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_FILE, VOCAB_FILE, INFO_FILE = "tokenizer.model", "tokenizer.vocab", "tokenizer.json"
FORMAT = "gptpipe-sentencepiece/1"


class Tokenizer:
    """A trained SentencePiece model plus the project's reserved ids."""

    def __init__(self, model_proto: bytes, info: dict[str, Any] | None = None, source: str = "<memory>"):
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.info = info or {}
        self.vocab_size: int = self.processor.get_piece_size()
        self.unk_id: int = self.processor.unk_id()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = self.processor.pad_id()
        self.special: dict[str, int] = {tok: self.processor.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in self.special.items() if self.processor.id_to_piece(i) != tok]
        if missing or min(self.bos_id, self.eos_id, self.pad_id) < 0:
            raise ArtifactError(
                f"{source}: tokenizer lacks reserved tokens {missing or ['bos/eos/pad']}; retrain it with stage 'tokenizer'"
            )
        self.newline_id: int = self.processor.piece_to_id(NEWLINE)
        self._hidden = {self.bos_id, self.eos_id, self.pad_id, *self.special.values()}

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load ``tokenizer.model`` (+ ``tokenizer.json``) from a tokenizer artifact directory."""
        directory = Path(directory)
        model = directory / MODEL_FILE
        if not model.is_file():
            raise ArtifactError(f"{directory}: no {MODEL_FILE}; pass the output directory of stage 'tokenizer'")
        info_path = directory / INFO_FILE
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        return cls(model.read_bytes(), info, str(directory))

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.processor.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Iterable[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return self.processor.encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Text of ``ids``. BOS/EOS/PAD, the chat markers (unless ``keep_special``) and ids outside
        the vocabulary (a model may pad its embedding table) are dropped."""
        hidden = {self.bos_id, self.eos_id, self.pad_id} if keep_special else self._hidden
        kept = [i for i in (int(x) for x in ids) if 0 <= i < self.vocab_size and i not in hidden]
        return self.processor.decode(kept)

    def id_to_piece(self, index: int) -> str:
        return self.processor.id_to_piece(int(index))

    def piece_to_id(self, piece: str) -> int:
        return self.processor.piece_to_id(piece)
