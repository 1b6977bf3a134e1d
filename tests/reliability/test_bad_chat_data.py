"""Bad chat JSONL for fine-tuning: refused with file:line and why, before any training step.

The fine-tuning stage runs as a container runs it, on a real tokenizer artifact (with the chat
special tokens) and a small pretrained model, under an MLflow parent run.
"""

from __future__ import annotations

import json

import pytest

from ._failure_checks import (
    assert_refused_cleanly,
    stage_argv,
)

GOOD = {"messages": [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]}


@pytest.fixture(scope="module")
def chat_inputs(tmp_path_factory):
    """(tokenizer ref, pretrain ref): a micro tokenizer trained here and an untrained 1-layer GPT."""
    from stages.executor import run_stage
    from stages.lm.model import GPT, GPTConfig
    from stages.lm.tokenizer import Tokenizer
    from stages.storage.stores import LocalStore
    from stages.training.checkpoint_format import save_model
    from tests._data_fixtures import micro_config
    from tests._training_fixtures import fake_artifact

    store = LocalStore(tmp_path_factory.mktemp("chat-inputs"))
    tokenizer = run_stage("tokenizer", micro_config("corpus.max_bytes=200000"), {}, store).ref
    vocab = Tokenizer.load(tokenizer.uri).vocab_size
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, block_size=64))
    pretrain = fake_artifact(store, "pretrain", lambda d: save_model(d / "model", model))
    return tokenizer, pretrain


def _lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


CASES = {
    "wrong-field-name": (
        _lines(*[{"conversation": GOOD["messages"]}] * 6),
        [
            "chat.jsonl:1: needs a 'messages' list or 'prompt' and 'response' fields (keys: ['conversation'])",
            "all 6 lines are malformed",
        ],
    ),
    "malformed-lines": (
        _lines(GOOD, GOOD, GOOD, '{"messages": [', GOOD, "not json at all", GOOD, GOOD),
        ["2 of 8 lines are malformed (more than finetune.max_bad_fraction=0.01)", "chat.jsonl:4: not valid JSON"],
    ),
    "no-assistant-turn": (
        _lines(*[{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(5)]),
        ["chat.jsonl:1: no assistant message, so there is nothing to train on"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_chat_jsonl_names_file_and_line_and_trains_nothing(
    case, chat_inputs, tmp_path, capsys, tracking_uri, parent_run
):
    text, expected = CASES[case]
    data = tmp_path / "chat.jsonl"
    data.write_text(text, encoding="utf-8")
    tokenizer, pretrain = chat_inputs
    store = tmp_path / "store"
    # No replay: this fixture has no data stage output, and the chat file is what is under test.
    argv = stage_argv(
        "finetune",
        sets=[f"finetune.data={data}", "finetune.max_steps=2", "finetune.device=cpu", "finetune.replay_fraction=0"],
        inputs={"tokenizer": tokenizer.uri, "pretrain": pretrain.uri},
        store=store,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run,
    )
    assert_refused_cleanly(capsys, argv, expected, store, tracking_uri, parent_run)
