"""The spot notice, read from a stand-in of the EC2 instance-metadata service on 127.0.0.1: what counts
as a notice, IMDSv2's token, the polling cadence, and a refused setting. The signal matrix (SIGTERM,
SIGINT, the notice, SIGKILL on a training run in its own process) is tests/reliability/test_preemption.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from stages.core.errors import ConfigError
from stages.training.preemption import NOTICE_POLL_ENV, NoticeWatcher, poll_interval, read_notice
from tests._spot_notice import NOTICE_PATH, SpotNoticeEndpoint


@pytest.mark.parametrize("require_token", [False, True], ids=["imdsv1", "imdsv2"])
def test_no_notice_until_the_endpoint_gives_one_then_its_action_and_time(require_token):
    with SpotNoticeEndpoint(require_token=require_token) as endpoint:
        assert read_notice(endpoint.url) is None  # 404: no notice yet
        endpoint.give_notice()
        reason = read_notice(endpoint.url)
    assert reason == f"a spot interruption notice (terminate at {endpoint.notice['time']})"
    assert len(endpoint.polls) == 2


def test_an_endpoint_that_does_not_answer_is_no_notice():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert read_notice(f"http://127.0.0.1:{port}{NOTICE_PATH}", timeout=0.5) is None


def test_the_watcher_polls_at_most_every_interval_and_reports_the_notice_once():
    seen: list[str] = []
    arrived = threading.Event()

    def on_notice(reason: str) -> None:
        seen.append(reason)
        arrived.set()

    with SpotNoticeEndpoint() as endpoint:
        watcher = NoticeWatcher(endpoint.url, 0.2, on_notice).start()
        try:
            deadline = time.monotonic() + 30  # a count of polls, not a time: a loaded machine polls late
            while len(endpoint.polls) < 4:
                assert time.monotonic() < deadline, f"the watcher stopped asking: {endpoint.polls}"
                time.sleep(0.05)
            endpoint.give_notice()
            assert arrived.wait(30), "the notice was never seen"
            polls = len(endpoint.polls)
            time.sleep(0.5)  # a watcher that kept polling would add polls here
        finally:
            watcher.close()
    assert len(endpoint.polls) == polls, "it polled again after reporting the notice"
    gaps = [b - a for a, b in zip(endpoint.polls, endpoint.polls[1:])]
    assert min(gaps) >= 0.18, gaps  # never more often than every 0.2 s
    assert seen == [f"a spot interruption notice (terminate at {endpoint.notice['time']})"]


def test_the_poll_interval_comes_from_the_environment_and_a_bad_one_is_refused(monkeypatch):
    monkeypatch.delenv(NOTICE_POLL_ENV, raising=False)
    assert poll_interval() == 5.0
    monkeypatch.setenv(NOTICE_POLL_ENV, "0.5")
    assert poll_interval() == 0.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(NOTICE_POLL_ENV, bad)
        with pytest.raises(ConfigError, match=f"{NOTICE_POLL_ENV}='{bad}': use a number of seconds > 0"):
            poll_interval()
