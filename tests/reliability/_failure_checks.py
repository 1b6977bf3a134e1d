"""What every bad-input test checks: one clear line, and nothing that claims success.

"Nothing claims success" means three things a later run or a person could be misled by:
no finished artifact in the store (a directory with a manifest, which ``find`` would reuse),
no MLflow run marked FINISHED, and — on a rerun with the same input — the same refusal
rather than a reused cache entry.
"""

from __future__ import annotations

from pathlib import Path

from stages.storage.artifacts import MANIFEST


def run_stage_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m stages ARGV`` in this process: (exit code, stdout, stderr).

    In-process keeps a case under a second; ``main`` is the same function the container runs,
    and any exception other than the project's own error type escapes and fails the test.
    """
    from stages.__main__ import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_gptpipe_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``gptpipe ARGV`` in this process (only for commands that fail before Prefect starts)."""
    from flows.cli.main import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str) -> str:
    """The single ``gptpipe: error:`` line of a failed command (asserts there is exactly one, no traceback)."""
    assert code != 0, "the command claimed success"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("gptpipe: error:")]
    assert len(lines) == 1, err
    return lines[0]


def one_line(exc: BaseException) -> str:
    from stages.core.errors import GptpipeError

    assert isinstance(exc, GptpipeError), f"{type(exc).__name__} is not the project's error type: {exc}"
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    return message


def finished_outputs(store_root: Path) -> list[Path]:
    """Every output directory in a local store that a reader would take as finished."""
    root = Path(store_root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/*/{MANIFEST}") if not p.parent.name.startswith("."))


def finished_runs(tracking_uri: str, parent_run_id: str) -> list[str]:
    """Names of the parent's child runs that MLflow shows as FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [run.info.run_name for run in children if run.info.status == "FINISHED"]


def child_statuses(tracking_uri: str, parent_run_id: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    return [run.info.status for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}'")]


def stage_argv(
    stage: str, *, sets: list[str], inputs: dict[str, str], store: Path, tracking_uri: str, parent_run_id: str
) -> list[str]:
    """``python -m stages`` arguments: ``--set`` each assignment, ``--input`` each artifact, tracked."""
    argv = [stage]
    for assignment in sets:
        argv += ["--set", assignment]
    for name, uri in inputs.items():
        argv += ["--input", f"{name}={uri}"]
    return [*argv, "--out", str(store), "--tracking-uri", tracking_uri, "--parent-run-id", parent_run_id]


def assert_refused_cleanly(
    capsys, argv: list[str], expected: list[str], store: Path, tracking_uri: str, parent_run_id: str
) -> str:
    """The stage fails in one line holding ``expected``, leaves nothing finished, and a rerun refuses alike."""
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    for part in expected:
        assert part in line, line
    assert finished_outputs(store) == []
    assert finished_runs(tracking_uri, parent_run_id) == []
    assert error_line(*run_stage_cli(capsys, *argv)[::2]) == line, (
        "a rerun must refuse the same way, not reuse anything"
    )
    return line
