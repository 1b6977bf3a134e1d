"""The registered model leaves the pipeline: MLflow loads and serves it, and it answers as ``gptpipe generate``.

After the micro pipeline against the real MLflow server (the session's ``server_pipeline``), the
first registry version holds the aliases ``champion`` and ``challenger`` (the promotion gate: no
champion before it), with its decision and lineage as tags, and the second run's identical export
leaves that decision unchanged. ``models:/gptpipe-micro@champion`` is loaded with
``mlflow.pyfunc.load_model`` in a fresh process (no torch imported, generation code from the model's own ``code/`` folder) and
served with ``mlflow models serve --env-manager local`` on 127.0.0.1; both must give exactly the
text ``gptpipe generate --onnx`` prints for the same prompt with greedy settings, whichever input
shape asks (a string, a list of strings, ``prompt`` rows, ``messages`` rows), and an input of no
accepted shape is a one-line error (HTTP 400 when served), never an empty answer; ``gptpipe generate
--registered`` answers the same through the alias. ``gptpipe promote`` / ``gptpipe rollback`` move
``champion`` on that server's registry (a second version registered in the test, deleted after) and
record why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from stages.registry import ORDER

from ._servers import MICRO, gptpipe, http_json

pytestmark = pytest.mark.slow

PROMPTS = ["Reverse: a b c", "def main():"]
NEW_TOKENS = 24
NAME = "gptpipe-micro"
CHAMPION = f"models:/{NAME}@champion"

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
model = mlflow.pyfunc.load_model(sys.argv[1])
prompts, params = json.loads(sys.argv[2]), {"max_new_tokens": int(sys.argv[3])}
chat = [{"role": "user", "content": prompts[0]}]
shapes = {
    "prompt rows": [{"prompt": p} for p in prompts],
    "a string": prompts[0],
    "a list of strings": prompts,
    "a prompt DataFrame": pd.DataFrame({"prompt": prompts}),
    "message rows": [{"messages": chat}],
    "a messages DataFrame": pd.DataFrame({"messages": [chat]}),
}
answers = {name: list(model.predict(value, params=params)) for name, value in shapes.items()}
try:
    refused = repr(model.predict([{"question": prompts[0]}], params=params))
except MlflowException as exc:
    refused = exc.message
runtime = sys.modules["stages.formats.onnx.runtime"].__file__
print(json.dumps({"answers": answers, "refused": refused, "torch": "torch" in sys.modules, "runtime": runtime}))
"""


def registered_version(services) -> dict:
    found = http_json(f"{services.mlflow_url}/api/2.0/mlflow/model-versions/search?filter=name%20%3D%20'gptpipe-micro'")
    return found["model_versions"][0]


def local_export(client_env) -> Path:
    """The export stage's output as the pipeline materialized it from the bucket (its S3 cache)."""
    found = [
        p.parent
        for p in Path(client_env["GPTPIPE_S3_CACHE"]).rglob("export.json")
        if (p.parent / "model_kv.onnx").is_file() and "export" in p.parent.parts
    ]
    assert found, "the pipeline's export is not in the client's S3 cache"
    return found[0]


@pytest.fixture(scope="module")
def expected(client_env, server_pipeline) -> list[str]:
    """What ``gptpipe generate --onnx`` prints (greedy) for each prompt, newline of print() removed."""
    export_dir = local_export(client_env)
    texts = []
    for prompt in PROMPTS:
        done = gptpipe(
            client_env,
            "generate",
            "--onnx",
            str(export_dir),
            "-p",
            prompt,
            "--max-new-tokens",
            str(NEW_TOKENS),
            cwd=server_pipeline["cwd"],
        )
        texts.append(done.stdout[:-1])
    return texts


def test_registered_version_is_an_mlflow_model_with_its_parity_tags(services, server_pipeline, tmp_path):
    version = registered_version(services)
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert float(tags["parity.max_abs_diff"]) <= float(tags["parity.tolerance"])
    # The export's equivalence certificate, one tag per format, read back through MLflow's API.
    certificate = {
        k.removeprefix("gptpipe.certificate."): v for k, v in tags.items() if k.startswith("gptpipe.certificate.")
    }
    assert {"PyTorch", "model.onnx", "model_kv.onnx", "architecture.onnx", "hf", "model.gguf", "genai"} <= set(
        certificate
    )
    assert certificate["genai"].startswith("max_abs_diff=") and re.search(r"greedy=(\d+)/\1;", certificate["genai"])
    served = tags["gptpipe.served_runtime"]
    assert certificate[served].endswith("; served"), (served, certificate[served])
    assert sum(value.endswith("; served") for value in certificate.values()) == 1
    listed = http_json(
        f"{services.mlflow_url}/api/2.0/mlflow/artifacts/list?run_id={version['run_id']}&path=onnx_model"
    )
    files = {f["path"].split("/", 1)[1] for f in listed["files"]}
    assert {"MLmodel", "pyfunc.py", "requirements.txt", "code", "artifacts", "parity.json"} <= files
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(
        run_id=version["run_id"],
        artifact_path="onnx_model/requirements.txt",
        dst_path=str(tmp_path),
        tracking_uri=services.mlflow_url,
    )
    requirements = {line.split("==")[0] for line in Path(path).read_text().split()}
    assert requirements == {"mlflow", "onnxruntime", "onnxruntime-genai", "sentencepiece", "numpy"}


def test_pyfunc_load_model_predicts_what_gptpipe_generate_prints(services, client_env, expected, tmp_path):
    uri = CHAMPION  # what every example loads: the alias the promotion gate moves, not a version number
    env = {k: v for k, v in client_env.items() if k != "PYTHONPATH"}  # stages must come from the model itself
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, uri, json.dumps(PROMPTS), str(NEW_TOKENS)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    answers = result["answers"]
    assert answers["prompt rows"] == answers["a list of strings"] == answers["a prompt DataFrame"] == expected
    assert answers["a string"] == expected[:1]
    # a messages list with one user turn is the same conversation
    assert answers["message rows"] == answers["a messages DataFrame"] == expected[:1]
    assert "got a row with unknown fields ['question']; it accepts a string" in result["refused"]
    assert "\n" not in result["refused"]
    assert result["torch"] is False, "serving must not need torch"
    assert "/code/stages/formats/onnx/runtime.py" in result["runtime"], result["runtime"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_models_serve_answers_invocations_with_the_same_text(services, client_env, expected, tmp_path):
    from flows.cli.services import wait_healthy

    uri = CHAMPION
    port = free_port()
    env = {k: v for k, v in client_env.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # serve execs `uvicorn`
    log = (tmp_path / "serve.log").open("wb")
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # 300 s: the server imports mlflow and loads the model, minutes when another run loads the machine.
        assert wait_healthy(f"http://127.0.0.1:{port}/ping", 300, server), (tmp_path / "serve.log").read_text(
            errors="replace"
        )[-4000:]
        body = {"dataframe_records": [{"prompt": p} for p in PROMPTS], "params": {"max_new_tokens": NEW_TOKENS}}
        answer = http_json(f"http://127.0.0.1:{port}/invocations", body)
        assert answer["predictions"] == expected
        params = {"max_new_tokens": NEW_TOKENS}
        chat = [{"role": "user", "content": PROMPTS[0]}]
        shapes = {
            "prompt columns": ({"inputs": {"prompt": PROMPTS}, "params": params}, expected),
            "a string": ({"inputs": PROMPTS[0], "params": params}, expected[:1]),
            "a list of strings": ({"inputs": PROMPTS, "params": params}, expected),
            "prompt instances": ({"instances": [{"prompt": p} for p in PROMPTS], "params": params}, expected),
            "message rows": ({"dataframe_records": [{"messages": chat}], "params": params}, expected[:1]),
            "message instances": ({"instances": [{"messages": chat}], "params": params}, expected[:1]),
        }
        for name, (body, wanted) in shapes.items():
            assert http_json(f"http://127.0.0.1:{port}/invocations", body)["predictions"] == wanted, name
        # MLflow's unified LLM request: the fields at the top level, the reply list unwrapped
        assert http_json(f"http://127.0.0.1:{port}/invocations", {"prompt": PROMPTS[0], **params}) == expected[:1]
        assert http_json(f"http://127.0.0.1:{port}/invocations", {"messages": chat, **params}) == expected[:1]
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_json(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"question": PROMPTS[0]}]})
        assert refused.value.code == 400
        error = json.loads(refused.value.read().decode())
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        line = error["message"].splitlines()[-1]  # MLflow's own 'Failed to predict data ...' line comes first
        assert "got a row with unknown fields ['question']; it accepts a string" in line, error["message"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# ---- the promotion gate and the aliases


def test_the_first_version_is_champion_with_its_decision_lineage_and_evaluation_as_tags(services, server_pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_url)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert client.get_model_version_by_alias(NAME, "challenger").version == version.version
    tags = version.tags
    assert tags["gptpipe.promotion.decision"] == "promote"
    assert json.loads(tags["gptpipe.promotion.reasons"]) == ["no champion yet: the first version becomes champion"]
    assert tags["gptpipe.promotion.compared_with"] == "none" and tags["gptpipe.promotion.by"] == "gate"
    refs = {
        key.removeprefix("gptpipe.ref."): json.loads(v) for key, v in tags.items() if key.startswith("gptpipe.ref.")
    }
    assert set(ORDER) - {"publish"} <= set(refs), refs  # every stage output the version is made of
    assert refs["export"]["uri"] == tags["gptpipe.artifact"] and refs["export"]["digest"] == tags["gptpipe.digest"]
    assert json.loads(tags["gptpipe.lineage.root_data"]) == refs["data"]  # a first version starts its lineage
    # the evaluate stage's headline figures, the fine-tuned model's as the report card shows them
    assert float(tags["eval.sft_bits_per_byte"]) > 0 and 0 <= float(tags["eval.sft_accuracy"]) <= 1
    assert not any(key.startswith("eval.champion_") for key in tags)  # no champion: nothing compared
    history = json.loads(client.get_registered_model(NAME).tags["gptpipe.promotion.history"])
    assert [(h["version"], h["by"]) for h in history][:1] == [(version.version, "gate")]
    # the second run registered nothing new: the decision stands, no alias moved
    second = server_pipeline["runs"][1]["stdout"]
    assert f"promotion: existing version {version.version}, decision unchanged (promote; " in second, second[-2000:]
    decided = [client.get_run(run["parent_run_id"]).data.tags for run in server_pipeline["runs"]]
    assert [t["gptpipe.promotion.decision"] for t in decided] == ["promote", "unchanged"]
    artifacts = http_json(
        f"{services.prefect_url}/artifacts/filter", {"artifacts": {"key": {"any_": ["gptpipe-promotion-micro"]}}}
    )
    texts = [a["data"] for a in artifacts]
    assert any(f"version {version.version} promoted to champion" in t for t in texts), texts
    assert any("decision unchanged" in t for t in texts), texts


def test_gptpipe_generate_registered_answers_through_the_champion_alias(client_env, server_pipeline, expected):
    done = gptpipe(
        client_env,
        "generate",
        "--registered",
        "--config",
        str(MICRO),
        "-p",
        PROMPTS[0],
        "--max-new-tokens",
        str(NEW_TOKENS),
        cwd=server_pipeline["cwd"],
    )
    assert done.stdout[:-1] == expected[0]
    assert f"[{CHAMPION} = version " in done.stderr


def _cli(*argv: str) -> int:
    """A gptpipe command in this process (the services' MLFLOW_TRACKING_URI set by the caller)."""
    from flows.cli.main import build_parser

    args = build_parser().parse_args([*argv, "--config", str(MICRO)])
    return args.func(args)


def test_promote_and_rollback_move_the_champion_alias_and_record_why(services, server_pipeline, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from stages.core.errors import GptpipeError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_url)
    client = MlflowClient(tracking_uri=services.mlflow_url)
    first = client.get_model_version_by_alias(NAME, "champion")
    before = len(json.loads(client.get_registered_model(NAME).tags["gptpipe.promotion.history"]))
    # a second version of the same model folder: a different export as far as the registry knows
    second = client.create_model_version(NAME, first.source, run_id=first.run_id, tags={"gptpipe.digest": "other"})
    try:
        assert _cli("promote", second.version, "--reason", "reviewed: better on held-out items") == 0
        assert f"{NAME}: champion -> version {second.version} (was version {first.version})" in capsys.readouterr().out
        assert client.get_model_version_by_alias(NAME, "champion").version == second.version
        promoted = client.get_model_version(NAME, second.version).tags
        assert (promoted["gptpipe.promotion.by"], promoted["gptpipe.promotion.reason"]) == (
            "promote",
            "reviewed: better on held-out items",
        )

        assert _cli("rollback", "--reason", "answers regressed in production") == 0
        assert f"(rolled back from version {second.version})" in capsys.readouterr().out
        assert client.get_model_version_by_alias(NAME, "champion").version == first.version
        rolled = client.get_model_version(NAME, second.version).tags["gptpipe.promotion.rolled_back"]
        assert rolled.endswith(f"champion back to version {first.version}: answers regressed in production")
        history = json.loads(client.get_registered_model(NAME).tags["gptpipe.promotion.history"])
        assert [(h["version"], h["by"], h["reason"]) for h in history[before:]] == [
            (second.version, "promote", "reviewed: better on held-out items"),
            (first.version, "rollback", "answers regressed in production"),
        ]
        with pytest.raises(
            GptpipeError, match=f"version {first.version} is the first champion in its history; nothing"
        ):
            _cli("rollback")
        with pytest.raises(GptpipeError, match=f"'{NAME}' has no version 99; its versions: {second.version}, "):
            _cli("promote", "99")
        with pytest.raises(GptpipeError, match="no registered model 'no-such-model' at http://127.0.0.1:"):
            _cli("promote", "1", "--model", "no-such-model")
    finally:  # the other modules' tests count this model's versions
        if client.get_model_version_by_alias(NAME, "champion").version != first.version:
            client.set_registered_model_alias(NAME, "champion", first.version)
        client.delete_model_version(NAME, second.version)
