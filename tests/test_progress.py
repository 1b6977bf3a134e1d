"""Progress in files: plain lines at an interval, never carriage-return frames."""

from __future__ import annotations

import io

from stages.core.progress import ENV, LineProgress, progress_bar
from stages.core.tracking import MemoryTracker
from stages.training.loop import train
from tests._training_fixtures import StreamBatches, micro_config, micro_model, repetitive_stream


def test_a_stream_that_is_not_a_terminal_gets_lines_every_interval(monkeypatch):
    monkeypatch.delenv("GPTPIPE_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress_bar(total=100, desc="work", file=out, unit="doc")
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.update(1)
        bar.set_postfix(loss="1.000", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # every 10 % by default, and no extra line at close when the last one was written
    assert lines[0].startswith("work: 10/100 doc (10%)") and lines[-1].startswith("work: 100/100 doc (100%)")
    assert "loss=1.000" in lines[-1]


def test_an_explicit_interval_and_a_partial_end(monkeypatch):
    monkeypatch.delenv("GPTPIPE_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress_bar(total=25, desc="steps", file=out, every=10, initial=0)
    bar.update(3)
    bar.update(9)  # crosses 10 inside one update
    bar.update(5)
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["12/25", "17/25"]


def test_disabled_and_forced_bar(monkeypatch):
    out = io.StringIO()
    quiet = progress_bar(total=4, file=out, disable=True)
    quiet.update(4)
    quiet.close()
    assert out.getvalue() == ""
    monkeypatch.setenv("GPTPIPE_PROGRESS", "bar")
    assert not isinstance(progress_bar(total=4, file=io.StringIO()), LineProgress)


def test_our_bar_on_a_terminal_stays_on_where_library_bars_were_turned_off(monkeypatch):
    """quiet_library_bars sets TQDM_DISABLE for the libraries' plain tqdm bars in a process whose
    stderr is a log; a bar of gptpipe's own drawn in that process (or a child) on a terminal stays."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv(ENV, "bar")
    bar = progress_bar(total=5, desc="pretrain", file=io.StringIO())
    assert not bar.disable
    bar.close()


def test_training_progress_in_a_log_has_no_carriage_returns(capsys, monkeypatch):
    monkeypatch.delenv("GPTPIPE_PROGRESS", raising=False)
    batches = StreamBatches(repetitive_stream(), 32, 4)
    train(
        micro_model(),
        batches,
        micro_config(max_steps=10, log_interval=5, eval_interval=5),
        MemoryTracker(),
        evaluate=lambda m: {"val_loss": 1.0},
    )
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [line for line in err.splitlines() if line.startswith("train: ")]
    assert [line.split(" ")[1] for line in steps] == ["5/10", "10/10"]
    assert "step 5: val_loss 1.0000" in err


def test_library_bars_are_off_in_a_log_and_a_users_choice_is_kept(tmp_path):
    """MLflow's artifact bar, transformers' weight-loading bar and its GGUF reader's bar wrote
    carriage-return frames into `make run > log`; with stderr a file, quiet_library_bars turns them
    off (checked in the libraries themselves, imported afterwards), and leaves alone a value the
    user set."""
    import os
    import subprocess
    import sys

    probe = (
        "from stages.core.progress import quiet_library_bars; quiet_library_bars()\n"
        "from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as m\n"
        "from transformers.utils import logging as t\n"
        "from tqdm.auto import tqdm\n"
        "print(m.get(), t.is_progress_bar_enabled(), not tqdm(range(3)).disable)\n"
    )
    from stages.core.progress import ENV, LIBRARY_BAR_SWITCHES

    env = {k: v for k, v in os.environ.items() if k not in (*LIBRARY_BAR_SWITCHES, ENV)}
    with open(tmp_path / "err.log", "w") as log:  # stderr is a file, as under `make run > log 2>&1`
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            stderr=log,
            capture_output=False,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        ).stdout
    assert out.split() == ["False", "False", "False"]  # any plain tqdm bar too (transformers' GGUF reader)
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true"
    with open(tmp_path / "err.log", "w") as log:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, stderr=log, stdout=subprocess.PIPE, text=True, check=True
        ).stdout
    assert out.split() == ["True", "False", "False"]
