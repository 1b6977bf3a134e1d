"""UTF-8 bytes per token id, computed from the SentencePiece pieces: an independent check of the
bytes-per-token figures the data and evaluate stages derive from the text itself."""

from __future__ import annotations

import numpy as np

from stages.lm.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer, ids) -> np.ndarray:
    """Bytes each id contributes to decoded text (0 for control ids, the unknown id and chat markers)."""
    sp = tokenizer.processor
    hidden = set(tokenizer.special.values())
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in hidden or sp.is_control(i) or sp.is_unknown(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths[np.asarray(ids, dtype=np.int64)]
