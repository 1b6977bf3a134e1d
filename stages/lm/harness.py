"""EleutherAI's lm-evaluation-harness on a gptpipe GPT: an adapter, local tasks, and a runner.

``harness_model(model, tokenizer)`` is an ``lm_eval.api.model.TemplateLM`` over gptpipe's own
PyTorch model and SentencePiece tokenizer (no transformers), so any harness task runs on a
gptpipe checkpoint:

* ``loglikelihood`` / ``loglikelihood_rolling``: right-padded batches (the model is causal, so
  padding after a sequence never changes the positions before it); rolling windows of
  ``block_size`` with the harness's own windowing, each document preceded by EOS — the
  separator the data stage puts between documents;
* ``generate_until``: greedy, KV cache (``stages.lm.generate.generate_greedy_batch``), stopping
  at ``<|end|>``/EOS, then cut at the request's ``until`` strings.

``write_local_tasks`` turns held-out items into two tasks the harness reads from local
YAML + JSONL (``dataset_path: json``): ``gptpipe_heldout`` (generate_until, exact match) and
``gptpipe_bpb`` (loglikelihood_rolling: bits per byte). Nothing is fetched from a hub: public
harness tasks need their datasets reachable (or in the local Hugging Face cache).

lm-eval is imported only when a harness function is called: the evaluate stage needs it only
when ``evaluate.lm_eval_tasks`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.progress import is_terminal
from stages.lm.chat import END_TOKEN
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer

log = logging.getLogger("gptpipe.harness")

HELDOUT_TASK, BPB_TASK = "gptpipe_heldout", "gptpipe_bpb"
LOCAL_TASKS = (HELDOUT_TASK, BPB_TASK)

# Both tasks read one local JSONL file as their test split (nothing is fetched from a hub).
LOCAL_JSON_TASK = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""

HELDOUT_YAML = (
    LOCAL_JSON_TASK
    + """\
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["{end}"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
"""
)

BPB_YAML = (
    LOCAL_JSON_TASK
    + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
)


def harness_model(model: GPT, tokenizer: Tokenizer, batch_size: int = 16) -> Any:
    """An ``lm_eval`` model object for ``model`` (kept in eval mode on its own device)."""
    from stages.lm.harness_adapter import GptpipeLM  # imports lm-eval: only when the harness is used

    return GptpipeLM(model, tokenizer, batch_size)


def write_local_tasks(directory: Path, records: list[dict], texts: list[str], max_new_tokens: int) -> Path:
    """Write ``gptpipe_heldout`` (held-out chat items) and ``gptpipe_bpb`` (texts) as harness tasks.

    A held-out item's prompt is the chat template rendered as text (the chat markers are
    atomic tokens, so the harness's ``tok_encode`` gives exactly ``ChatTemplate.render_prompt``).
    Returns ``directory``, the ``include_path`` for the harness's task manager.
    """
    directory.mkdir(parents=True, exist_ok=True)
    heldout = directory / f"{HELDOUT_TASK}.jsonl"
    with heldout.open("w", encoding="utf-8") as handle:
        for record in records:
            messages = record["messages"]
            prompt = "".join(f"<|{m['role']}|>{m['content']}{END_TOKEN}" for m in messages[:-1]) + "<|assistant|>"
            handle.write(json.dumps({"prompt": prompt, "answer": messages[-1]["content"]}, ensure_ascii=False) + "\n")
    bpb = directory / f"{BPB_TASK}.jsonl"
    with bpb.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (directory / f"{HELDOUT_TASK}.yaml").write_text(
        HELDOUT_YAML.format(
            task=HELDOUT_TASK, data=json.dumps(str(heldout)), end=END_TOKEN, max_new_tokens=max_new_tokens
        ),
        encoding="utf-8",
    )
    (directory / f"{BPB_TASK}.yaml").write_text(
        BPB_YAML.format(task=BPB_TASK, data=json.dumps(str(bpb))), encoding="utf-8"
    )
    return directory


@contextlib.contextmanager
def _request_bars_as_lines() -> Iterator[None]:
    """The harness draws bars while it reads a task's data (datasets) and builds its requests
    (plain tqdm, no switch): in a log file those are carriage-return frames, so off with both
    unless stderr is a terminal, and back as they were afterwards."""
    import datasets.utils as datasets_utils
    import lm_eval.api.task as task_module

    if is_terminal(sys.stderr):
        yield
        return
    original, datasets_quiet = task_module.tqdm, datasets_utils.are_progress_bars_disabled()
    task_module.tqdm = functools.partial(original, disable=True)
    datasets_utils.disable_progress_bars()
    try:
        yield
    finally:
        task_module.tqdm = original
        if not datasets_quiet:
            datasets_utils.enable_progress_bars()


def run_tasks(
    model: GPT,
    tokenizer: Tokenizer,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Run harness ``tasks`` on ``model``; ``{task: {metric: value}}`` (the harness's own figures)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing the harness's thousands of built-in task files takes minutes on a busy 2-core
    # machine: skip it when every task asked for is one of ours.
    only_local = include_path is not None and set(tasks) <= set(LOCAL_TASKS)
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=not only_local)
    with _request_bars_as_lines():
        output = simple_evaluate(
            model=harness_model(model, tokenizer, batch_size),
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    results: dict[str, dict[str, float]] = {}
    for task, figures in output["results"].items():
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in figures.items()
            if isinstance(value, (int, float)) and key != "sample_len" and "_stderr" not in key
        }
    return results


def validation_texts(shards: Any, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """The first ``max_tokens`` of a token split decoded back to documents (split at EOS): the
    text gptpipe's own bits per byte is measured on, for ``gptpipe_bpb``."""
    ids = [int(t) for t in shards.window(0, min(max_tokens, len(shards)))]
    texts, start = [], 0
    for at, token in enumerate([*ids, tokenizer.eos_id]):
        if token == tokenizer.eos_id:
            if at > start:
                texts.append(tokenizer.decode(ids[start:at]))
            start = at + 1
    return [text for text in texts if text]
