"""gptpipe's GPT as an lm-evaluation-harness model: ``GptpipeLM``, a ``TemplateLM`` over gptpipe's own
PyTorch model and SentencePiece tokenizer (no transformers).

Importing this module imports lm-eval, so ``stages.lm.harness`` imports it only when a harness
function runs; see that module for how requests are batched, windowed and cut.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from stages.lm.chat import ChatTemplate
from stages.lm.generate import generate_greedy_batch
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer

log = logging.getLogger("gptpipe.harness")


class GptpipeLM(TemplateLM):
    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16):
        super().__init__()
        self.model = model.eval()
        self.sp = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.batch_size = batch_size
        self.block = model.cfg.block_size
        self.torch_device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.sp.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.sp.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per request, in request order."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.block + 1) :]
            rows.append((whole[:-1], whole[-len(continuation) :] if continuation else []))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            members = [i for i in order[start : start + self.batch_size]]
            width = max(len(rows[i][0]) for i in members)
            batch = torch.full((len(members), width), self.sp.pad_id, dtype=torch.long)
            for row, i in enumerate(members):
                batch[row, : len(rows[i][0])] = torch.tensor(rows[i][0])
            log_probs = F.log_softmax(self.model(batch.to(self.torch_device)).float(), dim=-1).cpu()
            for row, i in enumerate(members):
                inputs, targets = rows[i]
                if not targets:
                    continue
                picked = log_probs[row, len(inputs) - len(targets) : len(inputs)]
                wanted = torch.tensor(targets)
                total = float(picked.gather(1, wanted[:, None]).sum())
                results[i] = (total, bool((picked.argmax(dim=-1) == wanted).all()))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document, every token scored once (after an EOS prefix)."""
        windows, owners = [], []
        for number, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.block, context_len=1
            ):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (loglik, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at ``<|end|>``/EOS and then at the first ``until`` string."""
        prompts, untils, limits = [], [], []
        for request in requests:
            context, settings = request.args
            if settings.get("do_sample") or float(settings.get("temperature", 0.0) or 0.0) > 0.0:
                log.warning("generate_until: sampling requested; gptpipe's adapter generates greedily")
            until = settings.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            limits.append(int(settings.get("max_gen_toks", 256)))
            prompts.append(self.tok_encode(context)[-self.block :] or [self.eot_token_id])
        answers: list[str] = [""] * len(requests)
        for limit in sorted(set(limits)):
            members = [i for i, n in enumerate(limits) if n == limit]
            generated = generate_greedy_batch(
                self.model, [prompts[i] for i in members], limit, stop_ids=self.template.stop_ids
            )
            for i, ids in zip(members, generated):
                text = self.template.decode_answer(ids)
                for stop in untils[i]:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                answers[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return answers
