"""A flow run that ends on a ``GptpipeError`` logs its one line without Prefect's traceback; a bug keeps it."""

from __future__ import annotations

import logging
import sys

import pytest

from flows.run_logs import ENGINE_LOGGERS, ExplainedErrorsInOneLine, explain_errors_in_one_line
from stages.core.errors import ArtifactError


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed: %r", (exc,), info)


def test_an_explained_error_keeps_its_line_and_loses_its_traceback():
    record = _record(ArtifactError("runs/store/pretrain/abc: manifest missing; rerun the stage"))
    assert ExplainedErrorsInOneLine().filter(record)
    text = logging.Formatter().format(record)
    assert text == "failed: ArtifactError('runs/store/pretrain/abc: manifest missing; rerun the stage')"


def test_any_other_exception_keeps_its_traceback():
    record = _record(KeyError("a bug"))
    assert ExplainedErrorsInOneLine().filter(record)
    text = logging.Formatter().format(record)
    assert text.startswith("failed: KeyError('a bug')\nTraceback (most recent call last):")


def test_it_is_installed_once_per_engine_logger():
    explain_errors_in_one_line()
    explain_errors_in_one_line()
    for name in ENGINE_LOGGERS:
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, ExplainedErrorsInOneLine)]
        assert len(filters) == 1, name


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter("%(message)s").format(record))


@pytest.mark.parametrize(
    ("error", "traceback"), [(ArtifactError("checkpoint unreadable"), False), (ZeroDivisionError("a bug"), True)]
)
def test_a_real_flow_run_ending_on_it(prefect_harness, error, traceback):
    from prefect import flow

    @flow(name="fails")
    def fails():
        explain_errors_in_one_line()  # as the pipeline and stage flows do first
        raise error

    lines = _Lines()
    engine = logging.getLogger("prefect.flow_runs")
    engine.addHandler(lines)
    try:
        with pytest.raises(type(error)):
            fails()
    finally:
        engine.removeHandler(lines)
    reported = [line for line in lines.lines if line.startswith("Encountered exception during execution")]
    assert len(reported) == 1, lines.lines
    assert repr(error) in reported[0]
    assert ("Traceback (most recent call last)" in reported[0]) is traceback, reported[0]
