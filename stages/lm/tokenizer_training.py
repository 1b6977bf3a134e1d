"""Training a SentencePiece model that round-trips source code byte for byte, and writing it
as a tokenizer artifact (read back by ``stages.lm.tokenizer.Tokenizer.load``).

The trainer runs with the ``identity`` normalization (no NFKC, no whitespace squeezing),
whitespace-only pieces (runs of indentation become single tokens) and no dummy ``▁`` prefix.
SentencePiece treats every input string as one "sentence" and never learns a newline piece on
its own, so documents are fed line by line and ``"\\n"`` is a *user-defined symbol*: a reserved
piece that always encodes as its own single id. Nothing is remapped; ``decode`` gives the
newline back as is.

The artifact: ``tokenizer.model`` (the SentencePiece proto), ``tokenizer.vocab`` (one
``piece\\tscore`` per line, pieces JSON-escaped so the newline piece stays on one line) and
``tokenizer.json`` (special ids and training settings).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from stages.core.errors import DataError
from stages.core.sections import TokenizerConfig
from stages.lm.tokenizer import (
    BOS_ID,
    EOS_ID,
    FORMAT,
    INFO_FILE,
    MODEL_FILE,
    NEWLINE,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    VOCAB_FILE,
    Tokenizer,
)

# SentencePiece drops training sentences longer than max_sentence_length bytes; long lines
# are cut into pieces of at most _LINE_CHARS characters (4 bytes each at worst) instead.
_MAX_SENTENCE_BYTES = 16384
_LINE_CHARS = 4000

_TRAINER_SETTINGS = {
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "add_dummy_prefix": False,
    "split_by_whitespace": True,
}


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Documents as SentencePiece sentences: one per non-empty line, long lines cut in pieces."""
    for doc in documents:
        for line in doc.split(NEWLINE):
            for start in range(0, len(line), _LINE_CHARS):
                yield line[start : start + _LINE_CHARS]


def _explain_trainer_error(message: str, cfg: TokenizerConfig, train_bytes: int) -> str:
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for {train_bytes:,} bytes of training text "
            f"(it supports at most {too_high.group(2)}); set tokenizer.vocab_size lower or give corpus.source more text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} cannot hold the corpus's {too_low.group(2)} required characters "
            f"and reserved pieces; raise tokenizer.vocab_size or lower tokenizer.character_coverage (now {cfg.character_coverage})"
        )
    return f"SentencePiece training failed on {train_bytes:,} bytes: {message.splitlines()[0]}"


def train_model(documents: Sequence[str], cfg: TokenizerConfig) -> bytes:
    """Train on ``documents`` and return the serialized SentencePiece model."""
    train_bytes = sum(len(d.encode("utf-8")) for d in documents)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(documents),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            user_defined_symbols=[*SPECIAL_TOKENS, NEWLINE],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            pad_piece="<pad>",
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=cfg.threads,
            minloglevel=2,  # SentencePiece's INFO log is thousands of lines on stderr
            **_TRAINER_SETTINGS,
        )
    except RuntimeError as exc:
        raise DataError(_explain_trainer_error(str(exc), cfg, train_bytes)) from None
    return model.getvalue()


def write_artifact(tokenizer: Tokenizer, cfg: TokenizerConfig, out: Path) -> None:
    (out / MODEL_FILE).write_bytes(tokenizer.model_proto)
    processor = tokenizer.processor
    with open(out / VOCAB_FILE, "w", encoding="utf-8") as handle:
        for i in range(tokenizer.vocab_size):
            piece = json.dumps(processor.id_to_piece(i), ensure_ascii=False)[1:-1]
            handle.write(f"{piece}\t{processor.get_score(i):g}\n")
    info = {
        "format": FORMAT,
        "vocab_size": tokenizer.vocab_size,
        "unk_id": tokenizer.unk_id,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "newline_id": tokenizer.newline_id,
        "special": tokenizer.special,
        "model_type": cfg.model_type,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "character_coverage": cfg.character_coverage,
        "trainer_settings": _TRAINER_SETTINGS,
        "vocab_file_format": "piece<TAB>score per line, piece JSON-escaped without quotes",
        "sentencepiece_version": spm.__version__,
    }
    tokenizer.info = info
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
