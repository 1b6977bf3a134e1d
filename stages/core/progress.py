"""Progress reporting: a live tqdm bar on a terminal, plain lines everywhere else.

tqdm redraws its bar with carriage returns. On a terminal that is one line updating in place;
in a file (``make run > log``, CI, Prefect's captured output, a container's log) every redraw
stays, and one fine-tuning bar fills a single "line" with hundreds of frames. So every progress
display in the pipeline goes through ``progress_bar``: when the stream is a terminal it is a
tqdm bar with the given arguments; when it is not, it is ``LineProgress``, which writes one
ordinary line every ``every`` items (default: each 10 % of ``total``) and one at the end.

``GPTPIPE_PROGRESS=lines`` or ``=bar`` forces either form (e.g. ``bar`` under a terminal
multiplexer that does not look like a TTY, ``lines`` to test what a log file will show).

Libraries draw bars of their own (MLflow downloading a logged model's artifacts, transformers
loading weights or reading a GGUF file); ``quiet_library_bars`` turns those off too when the output
is not a terminal.
(lm-evaluation-harness's bars, its own and datasets', are silenced where ``stages.lm.harness`` runs it.)
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

if TYPE_CHECKING:
    from tqdm import tqdm

ENV = "GPTPIPE_PROGRESS"


def is_terminal(stream: TextIO) -> bool:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s"


class LineProgress:
    """The part of tqdm's interface the pipeline uses, written as whole lines at an interval.

    A line reads ``finetune: 100/300 (33%) 41.2s elapsed, ~1m22s left, loss=0.712, tok_s=2,480``:
    no carriage returns, no redraws, so a log file holds one line per report.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        unit: str = "it",
        file: TextIO | None = None,
        disable: bool = False,
        every: int | None = None,
    ) -> None:
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self.every = max(1, every if every else (total // 10 if total else 1))
        self._start_n, self._started = initial, time.perf_counter()
        self._last_written = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        # A line whenever the count crosses a multiple of `every` (an update may cross several).
        if not self.disable and self.n // self.every > before // self.every:
            self._line()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, s: str, file: TextIO | None = None, end: str = "\n", nolock: bool = False) -> None:
        stream = file if file is not None else self.file
        stream.write(s + end)
        stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_written and self.n > self._start_n:
            self._line()

    def _line(self) -> None:
        self._last_written = self.n
        elapsed = time.perf_counter() - self._started
        done = self.n - self._start_n
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n:,}"]
        if self.total:
            parts.append(f"/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f" {self.unit}")
        parts.append(f" {_seconds(elapsed)} elapsed")
        if self.total and 0 < done and self.n < self.total:
            parts.append(f", ~{_seconds(elapsed / done * (self.total - self.n))} left")
        if self._postfix:
            parts.append(f", {self._postfix}")
        self.write("".join(parts))

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Progress: TypeAlias = "tqdm | LineProgress"  # what progress_bar returns


# Environment switches that turn third-party tqdm bars off; read when the library is imported.
LIBRARY_BAR_SWITCHES = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's artifact uploads and downloads
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights"
    # Every other plain tqdm bar (transformers' GGUF reader: "Converting and de-quantizing GGUF
    # tensors"): tqdm reads TQDM_<ARG> as the argument's default when it is imported (so this module
    # imports it only to draw a bar). gptpipe's own bars are tqdm only on a terminal, and pass
    # ``disable`` themselves.
    "TQDM_DISABLE": "1",
}


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Off with the libraries' own bars unless ``stream`` (stderr) is a terminal; call it before
    importing them. A value the user set is kept."""
    if not is_terminal(stream if stream is not None else sys.stderr):
        for name, value in LIBRARY_BAR_SWITCHES.items():
            os.environ.setdefault(name, value)


def progress_bar(
    total: int | None = None, desc: str = "", *, file: TextIO | None = None, every: int | None = None, **kwargs: Any
) -> Progress:
    """A tqdm bar on a terminal, else a ``LineProgress`` writing a line every ``every`` items.

    ``kwargs`` are tqdm's (``initial``, ``unit``, ``disable``, ``leave``, ``mininterval``, ...);
    the line form honours ``initial``, ``unit`` and ``disable`` and ignores the display-only rest.
    ``every`` matters only for the line form: the training loop passes its ``log_interval``.
    """
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=stream, **{"disable": False, **kwargs})
    return LineProgress(
        total=total,
        desc=desc,
        initial=kwargs.get("initial", 0),
        unit=kwargs.get("unit", "it"),
        file=stream,
        disable=bool(kwargs.get("disable", False)),
        every=every,
    )


def byte_progress(total: int, desc: str, *, min_bytes: int) -> Progress:
    """Progress over ``total`` bytes of input (the data stages); silent below ``min_bytes``."""
    return progress_bar(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=total < min_bytes,
        leave=False,
    )
