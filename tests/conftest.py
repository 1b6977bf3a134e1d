"""Shared test setup: isolated Prefect home, one Prefect test server per session, small thread counts,
and the test tiers (markers) and xdist groups.

Tiers: ``make check`` runs what is not marked ``slow``, ``browser`` or ``container`` (seconds per
test); ``make test`` runs everything on three xdist workers. A test is ``slow`` when it trains a model
past a few steps, exports one, runs a pipeline or starts servers: its module says so, or it uses
one of the fixtures that do (``SLOW_FIXTURES``), or its file is listed in ``SLOW_FILES`` (files
other engineers own; marked here by name rather than edited).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from flows.process_env import EMBEDDED_ENV

ROOT = Path(__file__).resolve().parents[1]

# Before anything imports prefect or torch: keep Prefect's state out of the user's home (and out of
# the project's .prefect, the gptpipe command's), and the environment every gptpipe process has
# (the workers outnumber the cores: idle CPU threads sleep).
_PREFECT_HOME = tempfile.mkdtemp(prefix="gptpipe-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
for _name, _value in EMBEDDED_ENV.items():
    os.environ.setdefault(_name, _value)
# Stage loggers carry Prefect's API handler once a flow ran in this process; stages the tests call
# directly (no flow run) would then warn on every log line.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API shared by every flow test (starting one costs ~25 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Two intra-op threads per test process, or the cores shared out among xdist workers: two workers
# with two threads each on a 2-core machine only contend.
_THREADS = max(1, min(2, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def thread_share() -> int:
    """The CPU threads one test process (or the pipeline it starts) should use: ``_THREADS``."""
    return _THREADS


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(_THREADS)
    yield


@pytest.fixture(scope="session")
def micro_recipe() -> Path:
    return ROOT / "configs" / "micro.yaml"


# Session fixtures that start servers or build trained/exported models: a test using one is slow.
SLOW_FIXTURES = {"services", "client_env", "server_pipeline", "servers", "moto", "prefect_harness", "micro_upstream"}
# Files whose tests export a micro model (onnxruntime-genai package included) or train the default
# recipe; owned by other engineers, so marked here by name.
SLOW_FILES = {
    "test_export.py",
    "test_genai.py",
    "test_gguf.py",
    "test_hf_checkpoint.py",
    "test_architecture_view.py",
    "test_default_recipe.py",
}
# Under xdist each worker builds its own session (and module) fixtures. Tests sharing an expensive
# one run on one worker (``--dist loadgroup``): one Prefect + MLflow + moto set for the integration
# suite, one MLflow + moto pair for the reliability suite, one Prefect test harness, one export store.
GROUP_OF_FIXTURE = {
    "services": "integration-servers",
    "client_env": "integration-servers",
    "server_pipeline": "integration-servers",
    "servers": "reliability-servers",
    "prefect_harness": "prefect-harness",
}
# Modules that use the integration servers but run long on their own (an image build and a pipeline
# in containers; three scheduled nights): groups of their own, so another worker can take them. A
# worker that runs one of them starts its own server set (~15 s), which costs less than the wait.
OWN_GROUP_FILES = {"test_containers.py": "containers", "test_nightly.py": "nightly"}
# ``tests/_export_fixtures.exported`` keeps its store under the worker's own base temp dir: the
# modules calling it share one worker so the micro export is built once.
EXPORT_FILES = {
    "test_export.py",
    "test_genai.py",
    "test_gguf.py",
    "test_hf_checkpoint.py",
    "test_architecture_view.py",
    "test_publish_browser.py",
}


# The per-test limit of the slow tiers, unless a module marks its own: a pipeline-building session
# fixture's setup counts against its first test, and takes minutes on a loaded 2-core machine.
SLOW_TIMEOUT_S = 900


# tryfirst: xdist's own hook turns each test's xdist_group mark into its node id ("...@group") when it
# runs, so the marks must be on the items before it; added after, they were silently ignored and every
# worker built every session and module fixture of its own.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # A module goes where any of its tests' shared fixtures go, whole: its module-scoped fixtures
    # (test_containers' image build) must not be built on two workers either.
    module_group: dict[str, str] = {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        group = next((GROUP_OF_FIXTURE[f] for f in sorted(fixtures) if f in GROUP_OF_FIXTURE), None)
        if group is not None:
            module_group.setdefault(item.nodeid.split("::")[0], group)
    for item in items:
        name, module = item.path.name, item.nodeid.split("::")[0]
        fixtures = set(getattr(item, "fixturenames", ()))
        if name in SLOW_FILES or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        slow_tier = any(item.get_closest_marker(m) for m in ("slow", "browser", "container"))
        if slow_tier and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        # Else one worker per module: a module-scoped fixture (the default recipe's training run,
        # a torchrun reference curve, a trained tokenizer) is built once, not once per worker.
        group = OWN_GROUP_FILES.get(name) or module_group.get(module) or ("export" if name in EXPORT_FILES else module)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
    # Under xdist (the controller and every worker must collect the same order); one process keeps pytest's.
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "no":
        _longest_first(items)


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` every test must carry its group in its node id (``…@group``): that is
    all the scheduler reads. A pytest/xdist pair that drops it would spread a module's tests (and its
    session and module fixtures: a pipeline, the servers, an image build) over every worker."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        return
    ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid.rsplit("]", 1)[-1]]
    if ungrouped:
        raise pytest.UsageError(
            f"--dist loadgroup: {len(ungrouped)} test(s) lost their xdist group (e.g. {ungrouped[0]}); this "
            "pytest/pytest-xdist pair ignores xdist_group marks (pytest-dev/pytest-xdist#1386): install "
            "the versions pyproject.toml pins (make install)"
        )


# The longest xdist groups, longest first (from --durations). Under xdist the units are handed out
# in collection order (--no-loadscope-reorder) to whichever worker is free: starting the long ones
# first keeps one worker from beginning a 5-minute unit while the other has nothing left. At the start
# xdist also hands a worker whose first unit holds at most two tests a second unit, which then waits
# behind the first: the default recipe's run is read by three tests, so nothing queues behind it.
LONGEST_FIRST = [
    "tests/integration/test_default_recipe.py",
    "containers",
    "integration-servers",
    "nightly",
    "export",
    "tests/integration/test_concurrent_runs.py",
    "tests/integration/test_sweep.py",
    "prefect-harness",
    "reliability-servers",
]


def _longest_first(items) -> None:
    def rank(item) -> int:
        group = item.get_closest_marker("xdist_group").args[0]
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a group's own order is kept


def shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this test run sees (the run's base temp dir; a worker's
    own is a child of it), or this session's base temp dir without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def micro_upstream(tmp_path_factory):
    """Finished tokenizer, data and pretrain artifacts of the micro recipe, built once per test run:
    in a gptpipe store shared by all workers, where the stage lease makes a second worker wait for
    the first and reuse its artifacts (same content keys) instead of training again.

    Returns a function giving ``(store, refs)`` with a fresh ``refs`` dict each call."""
    from tests._sft_fixtures import build_micro_upstream

    store, refs = build_micro_upstream(shared_dir(tmp_path_factory) / "micro-upstream-store")
    return lambda: (store, dict(refs))
