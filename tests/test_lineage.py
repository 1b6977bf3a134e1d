"""continue_from and the champion as artifact references (flows/lineage.py); what a continued
pretraining does with the parent is tested with the stage (tests/test_pretrain.py).

Store URIs are resolved by walking real manifests: the micro recipe's tokenizer -> data -> pretrain
(the shared ``micro_upstream`` fixture) and hand-published outputs that name them as inputs. Registry
values are resolved through a real MLflow registry (SQLite) whose versions carry the lineage tags.
"""

from __future__ import annotations

import json
import logging

import pytest

from flows.lineage import (
    LINEAGE_STAGES,
    ROOT_DATA_TAG,
    Champion,
    Parent,
    lineage_tags,
    resolve_champion,
    resolve_parent,
    stage_inputs,
    tokenizer_drift,
)
from flows.report import FROM_PARENT, render_report
from stages.core.errors import ArtifactError, ConfigError
from stages.storage.artifacts import ArtifactRef, Manifest, files_digest, hash_files
from stages.storage.stores import LocalStore

MODEL = "gptpipe-lineage-test"
GONE = "gptpipe-lineage-gone"
UNCROWNED = "gptpipe-lineage-uncrowned"


def _publish(store: LocalStore, stage: str, inputs: dict[str, ArtifactRef], metrics: dict | None = None) -> ArtifactRef:
    """A finished output of ``stage`` that read ``inputs`` (one small file; its manifest is what counts)."""
    note = json.dumps({"stage": stage, "inputs": {k: v.digest for k, v in sorted(inputs.items())}, **(metrics or {})})
    scratch = store.scratch(stage, "fake")
    (scratch / "note.json").write_text(note, encoding="utf-8")
    files = hash_files(scratch)
    manifest = Manifest(
        stage=stage,
        key=f"fake-{files_digest(files)[:12]}",
        config={},
        inputs={name: ref.to_dict() for name, ref in inputs.items()},
        code_version="test",
        files=files,
        metrics=metrics or {},
        digest=files_digest(files),
    )
    return store.commit(scratch, manifest)


def _ref(stage: str, n: int = 1) -> ArtifactRef:
    return ArtifactRef(stage, f"/store/{stage}/key{n}", f"digest-{stage}-{n}")


# --- store URIs ---------------------------------------------------------------------------------


def test_a_pretrain_uri_resolves_to_its_tokenizer_data_and_itself(micro_upstream):
    store, refs = micro_upstream()
    parent = resolve_parent(refs["pretrain"].uri, str(store.root), None, MODEL)
    assert parent == Parent(
        source=refs["pretrain"].uri,
        tokenizer=refs["tokenizer"],
        pretrain=refs["pretrain"],
        data=refs["data"],
        root_data=refs["data"],  # it started its lineage: its own data holds the frozen held-out text
    )


def test_a_finetune_uri_walks_back_to_its_pretrain_and_the_lineage_root(micro_upstream, tmp_path):
    """finetune -> its pretrain (a continued one) -> that one's parent: root_data is the first pretrain's data."""
    store, refs = micro_upstream()
    ours = LocalStore(tmp_path / "store")
    grown = _publish(ours, "data", {"tokenizer": refs["tokenizer"]})
    continued = _publish(ours, "pretrain", {"tokenizer": refs["tokenizer"], "data": grown, "parent": refs["pretrain"]})
    finetune = _publish(ours, "finetune", {"tokenizer": refs["tokenizer"], "pretrain": continued})

    parent = resolve_parent(finetune.uri, str(tmp_path / "store"), None, MODEL)
    assert (parent.pretrain, parent.finetune, parent.tokenizer) == (continued, finetune, refs["tokenizer"])
    assert parent.data == grown and parent.root_data == refs["data"]
    assert parent.version is None


def test_what_cannot_be_continued_from_is_one_line_saying_what_to_pass(micro_upstream, tmp_path):
    store, refs = micro_upstream()
    cases = {
        refs["data"].uri: f"continue_from={refs['data'].uri}: that is a data output; pass the store URI of a "
        "pretrain or finetune output",
        str(tmp_path): f"continue_from={tmp_path}: {tmp_path}: no manifest.json; not a finished gptpipe artifact",
    }
    for value, line in cases.items():
        with pytest.raises(ConfigError if value == refs["data"].uri else ArtifactError) as failure:
            resolve_parent(value, str(store.root), None, MODEL)
        assert str(failure.value) == line
    with pytest.raises(ConfigError, match=r"^continue_from=.*: its tokenizer output .* is not in the recipe's store"):
        resolve_parent(refs["pretrain"].uri, "s3://bucket/store", None, MODEL)
    with pytest.raises(ConfigError) as failure:
        resolve_parent("champion", str(store.root), None, MODEL)
    assert str(failure.value) == (
        "continue_from=champion: the model registry is read from MLflow, but tracking is off (--no-track); "
        "turn tracking on, or continue from the store URI of a pretrain output"
    )
    assert resolve_parent("none", str(store.root), None, MODEL) is None


# --- the registry: champion alias and version numbers -------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An MLflow registry over a store of finished outputs: MODEL version 1 (lineage tags, alias champion),
    version 2 (no tags), version 3 (tags naming a pretrain output that was deleted); model GONE's champion
    names a finetune output that was deleted; model UNCROWNED has a version and no champion alias.
    Returns (client, refs of MODEL version 1, the store's root)."""
    import shutil

    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    store = LocalStore(root / "store")
    refs = {"tokenizer": _publish(store, "tokenizer", {})}
    refs["root_data"] = _publish(store, "data", {"tokenizer": refs["tokenizer"]}, {"bytes_per_token": 4.0})
    refs["data"] = _publish(store, "data", {"tokenizer": refs["tokenizer"]})
    refs["pretrain"] = _publish(store, "pretrain", {"tokenizer": refs["tokenizer"], "data": refs["data"]})
    refs["finetune"] = _publish(store, "finetune", {"tokenizer": refs["tokenizer"], "pretrain": refs["pretrain"]})
    gone = _publish(store, "pretrain", {"tokenizer": refs["tokenizer"]})
    shutil.rmtree(gone.uri)

    def tags(**named: ArtifactRef) -> dict[str, str]:
        found = {f"gptpipe.ref.{stage}": json.dumps(ref.to_dict()) for stage, ref in named.items()}
        return {**found, ROOT_DATA_TAG: json.dumps(refs["root_data"].to_dict())}

    complete = {stage: refs[stage] for stage in LINEAGE_STAGES}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    models = {MODEL: [complete, None, {**complete, "pretrain": gone}], GONE: [complete], UNCROWNED: [complete]}
    for model, versions in models.items():
        client.create_registered_model(model)
        for named in versions:
            client.create_model_version(model, str(root / "source"), tags=tags(**named) if named else None)
        if model != UNCROWNED:
            client.set_registered_model_alias(model, "champion", "1")
    gone_finetune = _publish(store, "finetune", {"tokenizer": refs["tokenizer"]})
    client.set_model_version_tag(GONE, "1", "gptpipe.ref.finetune", json.dumps(gone_finetune.to_dict()))
    shutil.rmtree(gone_finetune.uri)
    return client, refs, str(root / "store")


def test_champion_and_a_version_number_resolve_through_the_version_tags(registry):
    client, refs, store = registry
    expected = Parent(
        source="champion",
        tokenizer=refs["tokenizer"],
        pretrain=refs["pretrain"],
        data=refs["data"],
        finetune=refs["finetune"],
        version="1",
        root_data=refs["root_data"],
    )
    assert resolve_parent("champion", store, client, MODEL) == expected
    assert resolve_parent("1", store, client, MODEL) == Parent(**{**expected.__dict__, "source": "1"})
    champion = resolve_champion(client, MODEL)
    assert champion == Champion("1", refs["finetune"], refs["tokenizer"], refs["root_data"])


def test_registry_values_that_name_nothing_usable_are_one_line_each(registry):
    client, refs, store = registry
    lines = {
        ("7", MODEL): f"continue_from=7: model '{MODEL}' has no version 7; see its versions in the MLflow UI",
        ("2", MODEL): f"continue_from=2: version 2 of model '{MODEL}' has no gptpipe.ref.tokenizer or "
        "gptpipe.ref.pretrain tag (registered before lineage tags); continue from the store URI of its "
        "pretrain output instead",
    }
    for (value, model), line in lines.items():
        with pytest.raises((ConfigError, ArtifactError)) as failure:
            resolve_parent(value, store, client, model)
        assert str(failure.value) == line
    with pytest.raises(
        ArtifactError,
        match=r"^continue_from=3: /\S+/pretrain/fake-\w+: no finished pretrain output there \(deleted, or never "
        r"finished\); rebuild it by rerunning the recipe that made it, or continue from another model$",
    ):
        resolve_parent("3", store, client, MODEL)
    with pytest.raises(
        ArtifactError, match=rf"^the champion \({GONE} version 1\): /\S+/finetune/fake-\w+: no finished finetune output"
    ):
        resolve_champion(client, GONE)
    assert resolve_champion(None, MODEL) is None  # tracking off: no registry


def test_continue_from_champion_before_there_is_one_trains_from_scratch_with_one_warning(registry, caplog):
    """A nightly recipe says continue_from=champion from its first night on: no model registered yet, or
    one without the alias, is a run from scratch (no parent) and one warning line, not a failure."""
    client, refs, store = registry
    for model in ("gptpipe-never-registered", UNCROWNED):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gptpipe.flow"):
            assert resolve_parent("champion", store, client, model) is None
        # Each LogRecord once: in one full-suite run the same record reached caplog twice (printed once on
        # stderr), through a handler an earlier in-process flow left on the way up. Two loggings would
        # still be two records here.
        records = list({id(record): record for record in caplog.records}.values())
        assert [r.getMessage() for r in records] == [
            f"continue_from=champion: model '{model}' has no 'champion' alias yet; training from scratch, "
            "as continue_from=none would (a new lineage)"
        ]
        assert resolve_champion(client, model) is None  # and nothing to compare with
    # A version number that does not exist stays an error: it names one particular model.
    with pytest.raises(ConfigError, match=rf"^continue_from=2: model '{UNCROWNED}' has no version 2;"):
        resolve_parent("2", store, client, UNCROWNED)


# --- what the pipeline hands on ------------------------------------------------------------------


def test_lineage_inputs_reach_only_the_stages_that_declare_them():
    from stages.core.config import load_config
    from stages.stage_call import StageCall
    from tests._sft_fixtures import ROOT

    cfg = load_config(ROOT / "configs" / "micro.yaml")
    results = {s: {"ref": _ref(s, 2).to_dict()} for s in LINEAGE_STAGES}
    parent = Parent("champion", _ref("tokenizer"), _ref("pretrain"), version="1", root_data=_ref("data", 0))
    champion = Champion("1", _ref("finetune"), _ref("tokenizer"), _ref("data", 0))

    inputs = stage_inputs(results, parent, champion)
    evaluate = StageCall.for_recipe("evaluate", cfg, inputs).inputs
    assert (evaluate["champion"], evaluate["champion_tokenizer"], evaluate["frozen"]) == (
        champion.finetune,
        champion.tokenizer,
        champion.root_data,
    )
    assert StageCall.for_recipe("pretrain", cfg, inputs).inputs["parent"] == parent.pretrain
    lineage_names = {"parent", "champion", "champion_tokenizer", "frozen"}
    assert lineage_names.isdisjoint(StageCall.for_recipe("finetune", cfg, inputs).inputs)
    assert "parent" not in evaluate

    # The champion's own model again (a rerun of its recipe): no comparison, so evaluate's key is unchanged.
    itself = {**results, "finetune": {"ref": champion.finetune.to_dict()}}
    assert {"champion", "champion_tokenizer", "frozen"}.isdisjoint(stage_inputs(itself, None, champion))

    assert lineage_tags(parent, results) == {
        "gptpipe.lineage.parent_version": "1",
        "gptpipe.lineage.parent": json.dumps(parent.pretrain.to_dict()),
        ROOT_DATA_TAG: json.dumps(parent.root_data.to_dict()),
    }
    assert lineage_tags(None, results) == {ROOT_DATA_TAG: json.dumps(_ref("data", 2).to_dict())}  # a new lineage


def test_tokenizer_drift_warns_past_five_percent_fewer_bytes_per_token(tmp_path):
    store = LocalStore(tmp_path / "store")
    tokenizer = _publish(store, "tokenizer", {}, {"bytes_per_token": 3.9})
    root = _publish(store, "data", {"tokenizer": tokenizer}, {"bytes_per_token": 4.0})
    parent = Parent("champion", tokenizer, _ref("pretrain"), data=root, root_data=root)

    line, warn = tokenizer_drift(parent, {"bytes_per_token": 3.96})
    assert not warn and line == (
        "tokenizer drift: the parent's tokenizer gets 3.960 bytes/token on the new corpus, "
        "4.000 on its training corpus (-1.0%)"
    )
    line, warn = tokenizer_drift(parent, {"bytes_per_token": 3.7})
    assert warn and "(-7.5%); past the 5% warning level" in line
    # No data output of the lineage known: the tokenizer stage's own held-out figure.
    alone = Parent("champion", tokenizer, _ref("pretrain"))
    assert tokenizer_drift(alone, {"bytes_per_token": 3.9})[0].endswith("3.900 on its held-out text (+0.0%)")


def test_the_report_card_labels_the_parents_tokenizer_as_the_parents():
    record = {"ref": _ref("tokenizer").to_dict(), "metrics": {}, "wall_time_s": 0.0}
    report = {
        "recipe": "micro",
        "store": "/store",
        "continued_from": "champion (version 3)",
        "stages": {
            "tokenizer": {**record, "reused": True, "status": FROM_PARENT},
            "data": {**record, "reused": True, "status": "reused"},
        },
    }
    text = render_report(report)
    assert "reused by content key (nothing recomputed): data\n" in text
    assert "from the parent model, champion (version 3) (not rerun): tokenizer" in text
    assert "tokenizer  from parent  -" in text
