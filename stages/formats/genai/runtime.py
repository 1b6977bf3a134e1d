"""Generation on an onnxruntime-genai model folder: the runtime gptpipe serves from when the export
certified one (``stages.formats.served``).

``og.Generator`` keeps the KV cache inside onnxruntime-genai and its greedy pick
(``generate_next_token``) runs in C++, so a greedy reply costs what onnxruntime-genai's own loop
costs. Sampling takes the logits out and picks with ``chat_replies.pick_token``, the rule the ONNX
Runtime loop uses, so a seed gives the same tokens in both. The folder's context is the model's
``block_size``: onnxruntime-genai cannot slide a window past it, so a prompt that leaves too little
room is cropped from the left (gptpipe's own loop recomputes a sliding window instead).

Torch-free, like ``stages.formats.onnx.runtime``: the served MLflow model imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.formats.chat_replies import ChatReplies, pick_token
from stages.formats.genai import package as genai_package
from stages.formats.layout import GENAI_DIR, TOKENIZER_DIR


class GenaiGenerator(ChatReplies):
    """Chat replies and ids from ``export_dir/folder`` (an onnxruntime-genai model folder)."""

    def __init__(self, export_dir: str | Path, folder: str = GENAI_DIR, threads: int = 0):
        self.export_dir = Path(export_dir)
        self.folder = self.export_dir / folder
        self.tokenizer_dir = self.export_dir / TOKENIZER_DIR
        self.model = genai_package.open_model(self.folder, threads)
        self.context = genai_package.context_length(self.folder)
        self._og = genai_package.require_genai()

    def _generator(self, length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length)
        return self._og.Generator(self.model, params)

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop_ids=(),
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """New token ids after ``prompt_ids`` (a stop id included when hit); greedy unless ``temperature > 0``."""
        if not prompt_ids:
            raise ValueError("generate_ids needs at least one prompt token")
        new_tokens = min(max_new_tokens, self.context - 1)
        prompt = [int(t) for t in prompt_ids][-(self.context - new_tokens) :]
        stops = {int(s) for s in stop_ids}
        generator = self._generator(len(prompt) + new_tokens)
        generator.append_tokens(prompt)
        rng = np.random.default_rng(seed)
        new: list[int] = []
        while len(new) < new_tokens and not generator.is_done():
            if temperature <= 0.0:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
            else:
                token = pick_token(generator.get_logits().reshape(-1), temperature, top_k, rng)
                generator.append_tokens([token])
            new.append(token)
            if token in stops:
                break
        return new

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The logits for the position after ``prompt_ids`` (a vocab-sized row)."""
        generator = self._generator(len(prompt_ids) + 1)
        generator.append_tokens([int(t) for t in prompt_ids])
        return generator.get_logits().reshape(-1)

    def log_probs(self, ids: list[int]) -> np.ndarray:
        """log p(ids[i + 1] | ids[: i + 1]) for each position (``len(ids) - 1`` values, natural log).

        onnxruntime-genai hands out only the newest position's logits, so the ids go in one at a time.
        """
        ids = [int(t) for t in ids][-self.context :]
        generator = self._generator(len(ids))
        out = np.empty(len(ids) - 1, dtype=np.float64)
        for position, token in enumerate(ids[:-1]):
            generator.append_tokens([token])
            row = generator.get_logits().reshape(-1).astype(np.float64)
            top = row.max()
            out[position] = row[ids[position + 1]] - top - np.log(np.exp(row - top).sum())
        return out
