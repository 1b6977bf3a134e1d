"""What every served runtime shares: the next-token rule and the chat reply around a runtime's ids.

A runtime (``stages.formats.onnx.runtime.OnnxGenerator`` on ``model_kv.onnx``,
``stages.formats.genai.runtime.GenaiGenerator`` on an onnxruntime-genai folder) only turns prompt ids
into new ids; ``ChatReplies.generate`` renders the prompt with the project's one chat template and
decodes the answer, so every runtime replies to the same text with the same ids. Torch-free: the
served MLflow model imports this.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def pick_token(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Next token from one row of logits: the first maximum when ``temperature <= 0`` (as
    ``torch.argmax``, which the parity gate relies on), else a sample of softmax(logits / T),
    limited to the ``top_k`` largest when given (what the served MLflow model offers)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=probs / probs.sum()))


class ChatReplies:
    """``generate(prompt)`` for a runtime that has ``generate_ids`` and a ``tokenizer_dir``."""

    tokenizer_dir: Path
    # the runtime's own: (prompt ids, max new tokens, stop ids, temperature=, top_k=, seed=) -> new ids
    generate_ids: Callable[..., list[int]]
    _tokenizer: Any = None
    _template: Any = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer copied into the export (loaded on first use)."""
        if self._tokenizer is None:
            from stages.lm.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.tokenizer_dir)
        return self._tokenizer

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str:
        """Reply text to a user prompt (or message list) through the project's one chat template."""
        from stages.lm.chat import ChatTemplate

        if self._template is None:
            self._template = ChatTemplate(self.tokenizer)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.generate_ids(
            self._template.render_prompt(messages),
            max_new_tokens,
            self._template.stop_ids,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        return self._template.decode_answer(ids)
