"""How a flow run's log reads: the stages' own lines, and an explained error without a traceback.

``forward_stage_logs`` gives the stage loggers (``gptpipe.*``) the handlers Prefect gives its
"extra" loggers, the same way ``PREFECT_LOGGING_EXTRA_LOGGERS`` does, so a flow run started by a
worker whose environment lacks that variable still shows what the stages said.

``explain_errors_in_one_line``: Prefect's flow engine logs every exception that ends a flow run
with its traceback. A ``GptpipeError`` is a problem a person can act on, and its one-line message
already says what is wrong and what to do (``stages.core.errors``): a stopped run, a bad corpus,
a gate that failed. For those the record keeps its line and loses the traceback, in the terminal
and in the Prefect UI alike. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import logging

from stages.core.errors import GptpipeError

STAGE_LOGGER = "gptpipe"
# The loggers Prefect's flow and task engines report a run's exception on.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def forward_stage_logs(name: str = STAGE_LOGGER) -> None:
    """Give logger ``name`` the handlers Prefect gives its 'extra' loggers (API + console), once."""
    target = logging.getLogger(name)
    extra = logging.getLogger("prefect.extra")
    known = {type(h) for h in target.handlers}
    for handler in extra.handlers:
        if type(handler) not in known:
            target.addHandler(handler)
    if target.level == logging.NOTSET or target.level > logging.INFO:
        target.setLevel(logging.INFO)


class ExplainedErrorsInOneLine(logging.Filter):
    """Drop the traceback from a record whose exception is a ``GptpipeError``; keep the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], GptpipeError):
            record.exc_info = None
            record.exc_text = None
        return True


def explain_errors_in_one_line() -> None:
    """Install ``ExplainedErrorsInOneLine`` on Prefect's engine loggers, once per process."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExplainedErrorsInOneLine) for f in logger.filters):
            logger.addFilter(ExplainedErrorsInOneLine())
