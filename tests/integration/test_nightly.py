"""Scheduled training as a schedule runs it: three nights of the micro recipe in one s3:// store,
against the real Prefect, MLflow and S3 servers (the session's ``services``).

* Night 1 trains from scratch on a directory corpus of 96 standard-library files; the first
  version becomes ``champion``.
* Five files arrive (+5 %). Night 2 runs with ``--continue-from champion``: the parent's tokenizer,
  only the new files' units tokenized, pretraining from the parent's weights, evaluated beside the
  champion on the same ground, judged by the gate.
* Night 3 is a clearly worse model: from scratch, one pretraining step. The gate holds it back as
  ``challenger`` and says why; then a person promotes it by hand and rolls it back.

The micro model's exact match on 10 items is noise, so both nights allow any drop in it
(``registry.exact_match_drop=1``) and the gate decides on bits per byte alone; the default recipe's
figures, exact match included, are in docs/scheduled-training.md.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

import pytest

from tests._data_fixtures import stdlib_documents, write_corpus

from ._servers import MICRO, gptpipe

pytestmark = pytest.mark.slow

NAME = "gptpipe-nightly"
STORE = "s3://gptpipe/nightly"
FIRST, ADDED = 96, 5
UNIT_BYTES = 20_000  # ~15 units of ~300 KB: enough for a new file to leave most of them alone
EM_NOISE = ("--set", "registry.exact_match_drop=1")


def _recipe(corpus: Path) -> list[str]:
    return [
        "--config",
        str(MICRO),
        "--set",
        f"corpus.source={corpus}",
        "--set",
        "name=nightly",  # its own Prefect artifact keys and task names beside the session's micro runs
        "--set",
        f"artifacts.store={STORE}",
        "--set",
        f"tracking.registered_model={NAME}",
        "--set",
        f"data.unit_bytes={UNIT_BYTES}",
    ]


def _units(corpus: Path) -> list:
    """The data stage's work units for the corpus as it is now (what ``plan_units`` cuts)."""
    from stages.core.config import load_config
    from stages.storage.units import plan_units

    cfg = load_config(MICRO, [f"corpus.source={corpus}", f"data.unit_bytes={UNIT_BYTES}"])
    return list(plan_units(cfg.corpus, cfg.data.unit_bytes))


@pytest.fixture(scope="module")
def nights(client_env, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nightly")
    docs = stdlib_documents(FIRST + ADDED, chars=3000)
    corpus = write_corpus(root / "corpus", docs[:FIRST])
    recipe = _recipe(corpus)

    def night(label: str, *extra: str) -> dict:
        path = root / f"{label}.json"
        done = gptpipe(client_env, "run", *recipe, *extra, "--report-json", str(path), cwd=root, timeout=900)
        return {"stdout": done.stdout, "stderr": done.stderr, "report": json.loads(path.read_text())}

    out = {"corpus": corpus, "env": client_env, "recipe": recipe, "cwd": root}
    out["units_before"] = _units(corpus)
    out[1] = night("night1", *EM_NOISE)
    for i, doc in enumerate(docs[FIRST:]):  # new files sort after the old ones, as a day's arrivals would
        (corpus / f"doc_{FIRST + i:04d}.txt").write_text(doc, encoding="utf-8", newline="")
    out["units_after"] = _units(corpus)
    out[2] = night("night2", "--continue-from", "champion", *EM_NOISE)
    out[3] = night("night3", "--set", "pretrain.max_steps=1", *EM_NOISE)
    return out


def _manifest(env: dict[str, str], ref: dict):
    """An output's manifest, read from the store as the next night would (the servers' credentials)."""
    from flows.lineage import read_output_manifest
    from stages.storage.artifacts import ArtifactRef

    with mock.patch.dict(os.environ, env):
        return read_output_manifest(ArtifactRef.from_dict(ref))


def _metrics(night: dict, stage: str) -> dict:
    return night["report"]["stages"][stage]["metrics"]


def _client(services):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=services.mlflow_url)


def test_night_two_reuses_the_tokenizer_and_tokenizes_only_the_new_units(nights):
    one, two = nights[1]["report"]["stages"], nights[2]["report"]["stages"]
    assert two["tokenizer"]["ref"] == one["tokenizer"]["ref"], "the lineage keeps its tokenizer"
    assert two["data"]["ref"]["uri"] != one["data"]["ref"]["uri"], "a grown corpus is new data"
    # the data manifest names the same tokenizer digest as its input
    data_manifest = _manifest(nights["env"], two["data"]["ref"])
    assert data_manifest.inputs["tokenizer"]["digest"] == one["tokenizer"]["ref"]["digest"]
    assert "from parent" in nights[2]["stdout"], nights[2]["stdout"][-3000:]

    before = {unit.digests for unit in nights["units_before"]}
    fresh = [unit for unit in nights["units_after"] if unit.digests not in before]
    holding_new = [
        unit for unit in nights["units_after"] if any(Path(p.location).name >= f"doc_{FIRST:04d}" for p in unit.pieces)
    ]
    assert holding_new and fresh, "the new files land in units of their own or in the last one"
    assert all(unit in fresh for unit in holding_new)
    assert len(fresh) <= len(holding_new) + 1, "beside the new files' units, at most one old unit is cut anew"
    data = _metrics(nights[2], "data")
    assert data["units_computed"] == len(fresh), data
    assert data["units_reused"] == len(nights["units_after"]) - len(fresh) > 0, data


def test_night_two_pretraining_starts_from_the_parent_not_from_random_weights(nights):
    one, two = _metrics(nights[1], "pretrain"), _metrics(nights[2], "pretrain")
    vocab = 400  # configs/micro.yaml: a random model's loss is ln(vocab)
    assert one["initial_loss"] > 0.9 * math.log(vocab), one
    assert two["initial_loss"] < 0.8 * math.log(vocab), two
    assert two["initial_loss"] < one["final_train_loss"] * 1.2, (one, two)
    assert two["continued_from"] == _manifest(nights["env"], nights[1]["report"]["stages"]["pretrain"]["ref"]).key


def test_night_two_carries_its_lineage_and_is_judged_against_the_champion(nights, services):
    client = _client(services)
    first, second = nights[1]["report"]["promotion"], nights[2]["report"]["promotion"]
    assert (first["decision"], second["decision"]) == ("promote", "promote"), (first, second)
    assert (first["compared_with"], second["compared_with"]) == (None, str(first["version"]))
    version = client.get_model_version(NAME, second["version"])
    tags = version.tags
    assert tags["gptpipe.lineage.parent_version"] == str(first["version"])
    parent = json.loads(tags["gptpipe.lineage.parent"])
    assert parent["uri"] == nights[1]["report"]["stages"]["pretrain"]["ref"]["uri"]
    assert json.loads(tags["gptpipe.lineage.root_data"]) == nights[1]["report"]["stages"]["data"]["ref"]
    run = client.get_run(nights[2]["report"]["parent_run_id"]).data.tags
    assert (
        run["gptpipe.lineage.parent_version"] == str(first["version"])
        and run["gptpipe.promotion.decision"] == "promote"
    )
    assert client.get_model_version_by_alias(NAME, "champion").version == str(second["version"])

    evaluate = _metrics(nights[2], "evaluate")
    for metric in ("exact_match", "frozen_bpb", "val_bpb"):
        assert f"challenger_{metric}" in evaluate and f"champion_{metric}" in evaluate, evaluate
    # night 1's model judged as a challenger would be: its own figures are the champion's of night 2
    assert evaluate["champion_frozen_bpb"] > evaluate["challenger_frozen_bpb"]
    card = nights[2]["stdout"]
    assert f"champion (version {first['version']})" in card and "challenger (this run)" in card, card[-3000:]
    assert "frozen-set bits per byte" in card and "difference" in card, card[-3000:]
    assert f"version {second['version']} promoted to champion" in card, card[-3000:]


def test_a_worse_challenger_is_held_back_and_a_person_can_promote_and_roll_back(nights, services):
    client = _client(services)
    second = str(nights[2]["report"]["registered_model"]["version"])
    third = nights[3]["report"]["promotion"]
    assert third["decision"] == "hold", third
    assert any(r.startswith("frozen-set bits per byte") and "> registry.bpb_rise" in r for r in third["reasons"]), third
    assert client.get_model_version_by_alias(NAME, "challenger").version == str(third["version"])
    assert client.get_model_version_by_alias(NAME, "champion").version == second
    assert f"version {third['version']} held as challenger, champion stays version {second}" in nights[3]["stdout"]

    env, cwd = nights["env"], nights["cwd"]
    gptpipe(env, "promote", str(third["version"]), "--reason", "reviewed by hand", *nights["recipe"], cwd=cwd)
    assert client.get_model_version_by_alias(NAME, "champion").version == str(third["version"])
    gptpipe(env, "rollback", "--reason", "worse on held-out text", *nights["recipe"], cwd=cwd)
    assert client.get_model_version_by_alias(NAME, "champion").version == second
