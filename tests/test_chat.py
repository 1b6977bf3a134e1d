"""Chat format, template and loss mask; synthetic tasks; exact-match scoring."""

from __future__ import annotations

import json

import pytest

from stages.core.errors import ConfigError, DataError
from stages.lm.chat import IGNORE, ChatTemplate, read_chat_jsonl, validate_messages
from stages.lm.tasks import TASKS, exact_match, is_heldout, make_items, normalize_answer
from tests._sft_fixtures import CharTokenizer, write_chat_jsonl

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: a b"},
    {"role": "assistant", "content": "b a"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "b a"},
]


def test_loss_mask_covers_exactly_the_assistant_tokens():
    tok = CharTokenizer()
    rendered = ChatTemplate(tok).render(CONVO)
    assert len(rendered.ids) == len(rendered.mask)
    trained = [i for i, keep in zip(rendered.ids, rendered.mask) if keep]
    end = tok.special["<|end|>"]
    # Each assistant turn: its content then its <|end|>, nothing else.
    assert trained == tok.encode("b a") + [end] + tok.encode("b a") + [end]
    text = tok.decode(rendered.ids)
    assert text == (
        "<|system|>Be brief.<|end|><|user|>Reverse: a b<|end|>"
        "<|assistant|>b a<|end|><|user|>Again<|end|><|assistant|>b a<|end|>"
    )
    # The role marker that opens an assistant turn is context, not a target.
    for i, tid in enumerate(rendered.ids):
        if tid == tok.special["<|assistant|>"]:
            assert not rendered.mask[i]


def test_inputs_targets_shift_and_ignore():
    tok = CharTokenizer()
    rendered = ChatTemplate(tok).render(CONVO[1:3])
    inputs, targets = rendered.inputs_targets()
    assert inputs == rendered.ids[:-1]
    kept = [t for t in targets if t != IGNORE]
    assert kept == tok.encode("b a") + [tok.special["<|end|>"]]
    assert targets[: len(tok.encode("Reverse: a b")) + 2] == [IGNORE] * (len(tok.encode("Reverse: a b")) + 2)


def test_render_prompt_ends_with_assistant_marker():
    tok = CharTokenizer()
    template = ChatTemplate(tok)
    ids = template.render_prompt(CONVO[:2])
    assert ids[-1] == tok.special["<|assistant|>"]
    assert ids[:-1] == template.render(CONVO[:2]).ids


def test_prompt_response_short_form():
    messages = validate_messages({"prompt": "hi", "response": "yo"}, "x:1")
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_malformed_lines_reported_with_line_numbers(tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": CONVO})] * 3 + [
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path, max_bad_fraction=0.1)
    assert f"{path}:4" in str(err.value) and "3 of 6 lines" in str(err.value)
    with caplog.at_level("WARNING", logger="gptpipe.chat"):
        good = read_chat_jsonl(path, max_bad_fraction=0.5)
    assert len(good) == 3
    warned = caplog.text
    assert f"{path}:4" in warned and f"{path}:5" in warned and "role 'robot'" in warned
    assert f"{path}:7" in warned and "no assistant message" in warned


def test_empty_or_all_bad_file_never_trains_on_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no conversations"):
        read_chat_jsonl(empty, max_bad_fraction=1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1"):
        read_chat_jsonl(bad, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="not found"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "c.jsonl"
    write_chat_jsonl([CONVO, CONVO[1:3]], path)
    assert read_chat_jsonl(path) == [CONVO, CONVO[1:3]]


def test_template_refuses_tokenizer_without_chat_tokens():
    tok = CharTokenizer()
    tok.special = {"<|end|>": 6}
    with pytest.raises(DataError, match="<\\|system\\|>"):
        ChatTemplate(tok)


MIX = ("reverse", "sort", "repeat")


def test_tasks_are_seeded_correct_and_split_by_content():
    train = make_items(600, "train", seed=3, tasks=MIX)
    again = make_items(600, "train", seed=3, tasks=MIX)
    heldout = make_items(200, "heldout", seed=3, tasks=MIX)
    assert train == again
    assert make_items(50, "train", seed=4, tasks=MIX) != train[:50]
    assert len({(i.task, i.prompt) for i in heldout}) == 200  # unique held-out items
    assert not {(i.task, i.prompt) for i in heldout} & {(i.task, i.prompt) for i in train}
    assert all(is_heldout(i.task, i.prompt) for i in heldout)
    # A held-out split of another seed is still disjoint from this training set.
    other = make_items(200, "heldout", seed=99, tasks=MIX)
    assert not {(i.task, i.prompt) for i in other} & {(i.task, i.prompt) for i in train}
    for item in train[:30]:
        body = item.prompt.split(": ", 1)[1]
        if item.task == "reverse":
            assert item.answer.split() == body.split()[::-1]
        elif item.task == "sort":
            assert item.answer.split() == sorted(body.split())
        elif item.task == "repeat":
            times = int(item.prompt.split()[1])
            assert item.answer.split() == [body] * times
    assert {i.task for i in train} == {"reverse", "sort", "repeat"}
    assert make_items(5, "train", seed=1, tasks=("add",))[0].answer.isdigit()
    with pytest.raises(ConfigError, match="finetune.tasks"):
        make_items(5, "train", seed=1, tasks=("juggle",))
    assert set(TASKS) >= {"reverse", "sort", "repeat", "add", "last", "last_plus", "last_minus"}


def test_last_digit_family_answers_and_shares_the_prompt_ending():
    items = make_items(60, "train", seed=5, tasks=("last", "last_plus", "last_minus"))
    shift = {"last": 0, "last_plus": 1, "last_minus": -1}
    for item in items:
        number = item.prompt.rsplit(" ", 1)[1]
        assert number.isdigit() and item.prompt.endswith(number)  # the digit to read ends every prompt
        assert item.answer == str((int(number[-1]) + shift[item.task]) % 10)
    assert {i.task for i in make_items(10, "train", seed=5)} == {"last", "last_plus"}  # the default mix


def test_exact_match_normalizes_whitespace_and_cuts_at_stop():
    assert normalize_answer("  c  b\n a <|end|> junk") == "c b a"
    assert exact_match("c b a<|end|><|user|>more", "c b a")
    assert exact_match(" c\tb  a ", "c b a")
    assert not exact_match("c b", "c b a")
    assert not exact_match("c b a a", "c b a")
    assert exact_match("x STOP y", "x", stops=("STOP",))
