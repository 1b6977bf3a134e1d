"""A training run on an ``s3://`` store resumes on another machine: its checkpoints are mirrored.

The machine that trains keeps checkpoints in its local cache; a platform that stops it (a pod
evicted, a container removed, a spot instance reclaimed) takes that cache along. Here a
pretraining run on a store in moto (over HTTP) is stopped by SIGTERM after step 7, its cache is
deleted — the machine is gone — and the same run on a fresh cache brings the newest checkpoint back
from the store, resumes at step 7 and ends with the weights of an uninterrupted run, bit for bit.
Once the model is published the mirrored checkpoints are gone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from stages.storage.artifacts import read_manifest
from stages.storage.stores import S3Store
from tests._scale_fixtures import RESUMABLE_PRETRAIN, make_inputs, result_of, worker_args, worker_env

from ._servers import moto_bucket, moto_env

pytestmark = pytest.mark.slow

BUCKET = "gptpipe"
PRETRAIN = RESUMABLE_PRETRAIN  # 16 steps, a checkpoint every 4, dropout: the RNG must resume too


@pytest.fixture(scope="module")
def s3(moto, tmp_path_factory):
    """The environment that points gptpipe at moto, a boto3 client, and the inputs in the bucket."""
    env = moto_env(moto)
    direct = moto_bucket(moto, BUCKET)
    with pytest.MonkeyPatch.context() as patch:  # this process's uploads and downloads go to moto too
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        local = make_inputs(tmp_path_factory.mktemp("inputs"))

        def inputs_in(store_uri: str) -> dict:
            """The hand-made tokenizer and data outputs, published to the store at ``store_uri``."""
            store = S3Store(store_uri, cache_dir=tmp_path_factory.mktemp("upload-cache"))
            published = {}
            for name, ref in local.items():
                scratch = tmp_path_factory.mktemp(f"up-{name}")
                shutil.copytree(ref.uri, scratch, dirs_exist_ok=True)
                published[name] = store.ref(store.publish(scratch, read_manifest(Path(ref.uri))))
            return published

        yield {"env": env, "client": direct, "inputs_in": inputs_in}


def _run(s3, store: str, cache: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**worker_env(), **s3["env"], "GPTPIPE_S3_CACHE": str(cache)}
    args = worker_args(Path(store), s3["inputs_in"](store), tmp_path / "metrics.jsonl", PRETRAIN, *extra)
    args[args.index("--store") + 1] = store  # an s3:// URI, not a path
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def _weights(result: dict, cache: Path) -> dict[str, torch.Tensor]:
    from stages.storage.artifacts import ArtifactRef

    store = S3Store(result["uri"].rsplit("/pretrain/", 1)[0], cache_dir=cache)
    local = store.materialize(ArtifactRef("pretrain", result["uri"], result["digest"]))
    return safetensors.torch.load_file(str(local / "model" / "model.safetensors"))


def _mirrored(s3, prefix: str) -> list[str]:
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/pretrain/.checkpoints-")
    return sorted(item["Key"].split("/.checkpoints-", 1)[1].split("/", 1)[-1] for item in listed.get("Contents", []))


def test_a_run_whose_machine_is_lost_resumes_from_the_mirrored_checkpoint_to_the_same_weights(s3, tmp_path):
    reference = result_of(_run(s3, f"s3://{BUCKET}/reference", tmp_path / "cache-ref", tmp_path))

    store, first_machine = f"s3://{BUCKET}/mirrored", tmp_path / "cache-a"
    stopped = _run(s3, store, first_machine, tmp_path, "--sigterm-at", "7")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after step 7 of 16" in stopped.stderr
    assert {"step_00000004.done", "step_00000007.done"} <= set(_mirrored(s3, "mirrored"))
    shutil.rmtree(first_machine)  # the machine is gone, and its cache with it

    resumed = _run(s3, store, tmp_path / "cache-b", tmp_path)
    assert "checkpoint step_00000007 brought back from s3://gptpipe/mirrored/pretrain/.checkpoints-" in resumed.stderr
    assert "pretrain: resuming from step 7, checkpoint" in resumed.stderr
    final = result_of(resumed)
    expected, got = _weights(reference, tmp_path / "read-ref"), _weights(final, tmp_path / "read-final")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _mirrored(s3, "mirrored") == [], "the published model replaces the mirrored checkpoints"
