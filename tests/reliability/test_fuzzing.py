"""Property-based fuzzing of the three parsers that read what users and other machines write:
the recipe loader, the chat JSONL reader and the manifest reader.

The property: any input either parses or raises the project's own error type with a one-line
message — never a KeyError/TypeError/ValueError from deep inside. Inputs are biased towards
the real shapes (known keys, near-valid records) so the fuzzer gets past the first check.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stages.core.config import PipelineConfig, load_config, parse_config
from stages.core.errors import ArtifactError, ConfigError, DataError, GptpipeError
from stages.lm.chat import ROLES, read_chat_jsonl, validate_messages
from stages.storage.artifacts import MANIFEST, Manifest, read_manifest, verify
from tests._sft_fixtures import write_chat_jsonl

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _refused(error: type[GptpipeError], call) -> object:
    """Run ``call``; a refusal must be ``error`` with a non-empty, one-line message."""
    try:
        return call()
    except error as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return None


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))


def json_values(keys: st.SearchStrategy[str]) -> st.SearchStrategy:
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=20
    )


# --------------------------------------------------------------------------- recipes


def _field_names(model, seen=None) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if hasattr(info.annotation, "model_fields"):
            names |= _field_names(info.annotation)
    return names


CONFIG_KEYS = st.sampled_from(sorted(_field_names(PipelineConfig))) | st.text(max_size=8)


@FUZZ
@given(tree=st.dictionaries(CONFIG_KEYS, json_values(CONFIG_KEYS), max_size=6))
def test_any_recipe_tree_parses_or_is_a_config_error(tree):
    result = _refused(ConfigError, lambda: parse_config(tree, "fuzz.yaml"))
    assert result is None or isinstance(result, PipelineConfig)


override_keys = st.lists(CONFIG_KEYS, min_size=1, max_size=3).map(".".join)
overrides = st.lists(st.tuples(override_keys, st.text(max_size=20)).map("=".join) | st.text(max_size=20), max_size=3)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200), sets=overrides)
def test_any_recipe_file_and_overrides_load_or_are_a_config_error(text, sets):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        _refused(ConfigError, lambda: load_config(recipe, sets))


# --------------------------------------------------------------------------- chat JSONL


CHAT_KEYS = st.sampled_from(["messages", "role", "content", "prompt", "response", *ROLES]) | st.text(max_size=6)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | st.text(max_size=4), "content": st.text(max_size=20) | scalars}
    ),
    max_size=4,
)
records = st.one_of(
    json_values(CHAT_KEYS),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": scalars, "response": scalars}),
)


@FUZZ
@given(record=records)
def test_any_json_record_is_a_conversation_or_a_data_error(record):
    result = _refused(DataError, lambda: validate_messages(record, "chat.jsonl:1"))
    assert result is None or any(m["role"] == "assistant" for m in result)


lines = st.one_of(records.map(lambda r: json.dumps(r)), st.text(max_size=40))


@FUZZ
@given(body=st.lists(lines, max_size=6).map("\n".join) | st.binary(max_size=120), bad=st.floats(0, 1))
def test_any_chat_file_reads_or_is_a_data_error(body, bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
        result = _refused(DataError, lambda: read_chat_jsonl(path, bad))
        assert result is None or len(result) > 0


conversation = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=30)}), min_size=1, max_size=4
).map(lambda ms: [*ms, {"role": "assistant", "content": "ok"}])


@FUZZ
@given(conversations=st.lists(conversation, min_size=1, max_size=4))
def test_chat_jsonl_reads_back_unchanged(conversations):
    # Any text, including U+2028 and other characters str.splitlines() would split at.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        write_chat_jsonl(conversations, path)
        assert read_chat_jsonl(path) == conversations


# --------------------------------------------------------------------------- manifests


MANIFEST_KEYS = st.sampled_from(
    [
        "stage",
        "key",
        "config",
        "inputs",
        "code_version",
        "files",
        "metrics",
        "created_at",
        "wall_time_s",
        "digest",
        "uri",
    ]
) | st.text(max_size=6)
file_names = st.sampled_from(["a.txt", "sub/b.bin", "../up", "/abs", "", "x\0y", "~/h", "a\\b"]) | st.text(max_size=10)
near_manifests = st.fixed_dictionaries(
    {
        "stage": scalars,
        "key": scalars,
        "config": json_values(MANIFEST_KEYS),
        "code_version": scalars,
        "inputs": st.dictionaries(st.text(max_size=5), json_values(MANIFEST_KEYS), max_size=2),
        "files": st.dictionaries(file_names, scalars, max_size=3) | json_values(MANIFEST_KEYS),
    },
    optional={"metrics": json_values(MANIFEST_KEYS), "digest": scalars, "created_at": scalars, "extra": scalars},
)


@FUZZ
@given(
    text=st.one_of(st.text(max_size=200), json_values(MANIFEST_KEYS).map(json.dumps), near_manifests.map(json.dumps))
)
@example(text='{"\\n": null}')  # found by CI: a key holding a newline once made a two-line message
def test_any_manifest_text_is_read_or_is_an_artifact_error(text):
    result = _refused(ArtifactError, lambda: Manifest.from_json(text, "fuzz/manifest.json"))
    assert result is None or isinstance(result, Manifest)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifest=near_manifests)
def test_any_manifest_on_disk_verifies_or_is_an_artifact_error(manifest):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "artifact"
        (directory / "sub").mkdir(parents=True)
        (directory / "a.txt").write_text("alpha")
        (directory / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        _refused(ArtifactError, lambda: verify(directory, read_manifest(directory)))
