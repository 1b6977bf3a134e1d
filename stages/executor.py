"""The one executor: a stage call in, a finished, verified, tracked artifact out.

A ``StageCall`` is one value — which stage, its declared sections, its input references, the
store, where to track, whether to force — and ``execute(call)`` is the one place that

1. computes the content key (stage + its sections + its inputs' digests + its code version),
2. reuses the finished output for that key, or builds it in a fresh scratch directory,
3. opens the stage's MLflow run once (a child of the pipeline's run, by explicit id),
4. runs the stage in this process, or under ``torchrun`` when its own section asks for several
   processes (``stages.launchers``), and
5. checks what it reported, hashes its files and commits them atomically to the store.

Every way a stage runs goes through here: the Prefect task (``flows/stage_task.py``), a stage
container (``flows/stage_flow.py`` runs this function inside the container), and
``python -m stages``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from stages import launchers
from stages.core.errors import ArtifactError
from stages.core.stage import Stage
from stages.core.tracking import MemoryTracker, Tracker
from stages.stage_call import StageCall
from stages.storage.artifacts import MANIFEST, ArtifactRef, Manifest, cache_key, code_version, files_digest, hash_files
from stages.storage.lease import STALE, Lease, LeaseHolder, LeaseRecord, wait_for
from stages.storage.stores import LocalStore, Store, open_store

log = logging.getLogger("gptpipe.executor")


@dataclass
class StageResult:
    ref: ArtifactRef
    manifest: Manifest
    reused: bool
    wall_time_s: float
    run_id: str | None = None  # the stage's MLflow run, when tracked
    experiment_id: str | None = None
    waited_s: float = 0.0  # time spent waiting for another run that held the key's lease

    @property
    def status(self) -> str:
        """``ran`` (built here), ``waited`` (another run built it while this one waited) or ``reused``."""
        if not self.reused:
            return "ran"
        return "waited" if self.waited_s > 0 else "reused"

    def record(self) -> dict[str, Any]:
        """The result as plain data: what the flow hands the next stage and the report card."""
        return {
            "stage": self.manifest.stage,
            "ref": self.ref.to_dict(),
            "reused": self.reused,
            "status": self.status,
            "waited_s": round(self.waited_s, 1),
            "wall_time_s": 0.0 if self.reused else round(self.wall_time_s, 2),
            "metrics": self.manifest.metrics,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
        }


def key_config(call: StageCall) -> dict[str, Any]:
    """What of the recipe a stage's key and MLflow params hold: its sections, and, when it reads
    the corpus, the corpus files' fingerprint (an edited file must not reuse stale outputs)."""
    config = {name: value for name, value in call.config.items()}
    if "corpus" in config:
        from stages.storage.corpus import fingerprint

        config["corpus"] = {**config["corpus"], "fingerprint": fingerprint(call.sections().corpus)}
    return config


def needed_inputs(call: StageCall) -> dict[str, ArtifactRef]:
    """The input references the stage reads under its sections; a missing one is a one-line error."""
    needs = call.declared.inputs_for(call.sections())
    missing = [need for need in needs if need not in call.inputs]
    if missing:
        raise ArtifactError(f"stage '{call.stage}' needs input artifact(s) {', '.join(missing)}; pass --input NAME=URI")
    return {need: call.inputs[need] for need in call.declared.present_inputs(call.sections(), call.inputs)}


def call_key(call: StageCall) -> str:
    """The content key of the call's output."""
    return cache_key(call.stage, key_config(call), needed_inputs(call), code_version(call.declared.module))


def execute(call: StageCall, store: Store | None = None, tracker: Tracker | None = None) -> StageResult:
    """Reuse the finished output of ``call``'s content key, or build, verify and commit it.

    ``store`` defaults to ``open_store(call.store)`` (pass one to reuse a client); ``tracker``
    replaces the call's MLflow run (e.g. an in-memory tracker for a library user).
    """
    store = store or open_store(call.store)
    # Computed once, on first use inside the MLflow run's guard (it fingerprints the corpus for the
    # stages that read it; a corpus that cannot be read then fails the run rather than leaving it open).
    config = functools.cache(lambda: key_config(call))
    with _stage_run(call, config, tracker) as run_tracker:
        with _system_metrics(call, run_tracker):
            result = _find_or_build(call, config, store, run_tracker)
        if hasattr(run_tracker, "run_id"):  # an MLflow run: label it and attach the small outputs
            result.run_id, result.experiment_id = run_tracker.run_id, run_tracker.experiment_id
            run_tracker.set_tags({"gptpipe.reused": str(result.reused).lower(), "gptpipe.artifact": result.ref.uri})
            _log_outputs(run_tracker, call.stage, result, store)
    return result


def run_stage(
    name: str,
    cfg: Any,
    inputs: dict[str, ArtifactRef],
    store: Store,
    tracker: Tracker | None = None,
    force: bool = False,
) -> StageResult:
    """Stage ``name`` of recipe ``cfg`` on ``store``, untracked unless ``tracker`` is given."""
    location = str(store.root) if isinstance(store, LocalStore) else getattr(store, "uri", cfg.artifacts.store)
    call = StageCall.for_recipe(name, cfg, inputs, force=force, store=location)
    return execute(call, store, tracker or MemoryTracker())


def _find_or_build(
    call: StageCall, config: Callable[[], dict[str, Any]], store: Store, tracker: Tracker
) -> StageResult:
    """Reuse the key's output; else claim the key (or wait for the run that holds it) and build it."""
    declared = call.declared
    needed = needed_inputs(call)
    version = code_version(declared.module)
    key = cache_key(call.stage, config(), needed, version)
    if worker_rank():
        _run_worker_rank(call, store, key, needed, tracker)
    if not call.force and (existing := store.find(call.stage, key)) is not None:
        log.info("stage %s: reusing finished output %s (key %s)", call.stage, store.ref(existing).uri, key)
        return StageResult(store.ref(existing), existing, reused=True, wall_time_s=0.0)

    lease, finished, waited = _claim(call, store, key, getattr(tracker, "run_id", ""))
    if finished is not None:
        return StageResult(store.ref(finished), finished, reused=True, wall_time_s=0.0, waited_s=waited)
    try:
        with lease.keep_alive():
            # The previous holder may have published just before letting the key go.
            if not call.force and (existing := store.find(call.stage, key)) is not None:
                return StageResult(store.ref(existing), existing, reused=True, wall_time_s=0.0, waited_s=waited)
            manifest, wall = _build(call, store, key, config(), needed, version, lease, tracker)
    finally:
        _release(lease)
    log.info("stage %s: finished in %.1fs -> %s", call.stage, wall, store.ref(manifest).uri)
    return StageResult(store.ref(manifest), manifest, reused=False, wall_time_s=wall, waited_s=waited)


def worker_rank() -> bool:
    """A non-zero rank of a torchrun job that runs the executor on every rank (``torchrun -m stages``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def _run_worker_rank(
    call: StageCall, store: Store, key: str, needed: dict[str, ArtifactRef], tracker: Tracker
) -> NoReturn:
    """Train beside rank 0 in the key's work directory; rank 0 alone claims, logs and publishes.

    The stage ends a worker rank itself once its collective work is done (``exit_worker``); a
    stage that returns on a worker rank has nothing to publish from here, so the process ends.
    """
    if not call.force and store.find(call.stage, key) is not None:
        raise SystemExit(0)  # rank 0 reuses it: nothing to train
    local_inputs = {need: store.materialize(ref) for need, ref in needed.items()}
    out = store.resume_dir(call.stage, key)  # rank 0's directory too: the same checkpoints to resume
    out.mkdir(parents=True, exist_ok=True)
    call.declared.run(call.sections(), local_inputs, out, MemoryTracker())
    raise SystemExit(0)


def _release(lease: Lease) -> None:
    """Free the key for the next run. A release that fails (the store is unreachable) must not hide
    the stage's own outcome or error: the lease then goes stale after ``lease_s`` and is taken over."""
    try:
        lease.release()
    except Exception as exc:
        log.warning("stage %s: could not release the lease on key %s (%s)", lease.stage, lease.key, exc)


def _claim(call: StageCall, store: Store, key: str, run_id: str) -> tuple[Lease | None, Manifest | None, float]:
    """The key's lease, or the output another run finished while this one waited for it.

    A run that finds the key held waits (a line every ~15 s names the holder) until the holder
    publishes — then it reuses that output — or stops renewing its lease (it died): then this run
    takes the lease over and, for a training stage, resumes from the holder's checkpoints.
    """
    # The nodes of one multi-node run hold the key together (the first claims, the rest join).
    holder = LeaseHolder.current(run_id or "", launchers.node_group(call.declared, call.sections()))
    started = time.monotonic()
    last_line = [0.0]

    def progress(record: LeaseRecord, waited: float) -> None:
        if waited - last_line[0] >= 15 or last_line[0] == 0:
            last_line[0] = max(waited, 1e-9)
            log.info("stage %s: waiting for %s, which is building key %s", call.stage, record.describe(), key)

    while True:
        lease = store.claim(call.stage, key, holder, call.lease_s)
        if lease is not None:  # stages.storage.lease logs a takeover, naming the run it took over from
            waited = time.monotonic() - started if last_line[0] else 0.0
            return lease, None, waited
        outcome = wait_for(store, call.stage, key, call.lease_s, progress)
        if outcome != STALE and not call.force:
            waited = max(time.monotonic() - started, 1e-3)
            log.info(
                "stage %s: reusing key %s, built by another run while this one waited %.0fs", call.stage, key, waited
            )
            return None, outcome, waited


def _build(
    call: StageCall,
    store: Store,
    key: str,
    config: dict[str, Any],
    needed: dict[str, ArtifactRef],
    version: str,
    lease: Lease,
    tracker: Tracker,
) -> tuple[Manifest, float]:
    """Run the stage into the lease holder's work directory, then hash and publish it."""
    local_inputs = {need: store.materialize(ref) for need, ref in needed.items()}
    scratch = store.scratch(call.stage, key, lease)
    started = time.perf_counter()
    try:
        metrics = _launch(call, key, local_inputs, scratch, tracker)
        if metrics is None:  # one node of a multi-node run, not the one with rank 0, which commits
            manifest = _committed_by_rank_zero(call, store, key)
            store.discard(scratch)  # what is left of this node's own work directory, if anything
            return manifest, time.perf_counter() - started
        _check_headline(call.declared, metrics)
        wall = time.perf_counter() - started
        files = hash_files(scratch)
        manifest = Manifest(
            stage=call.stage,
            key=key,
            config=config,
            inputs={n: ref.to_dict() for n, ref in sorted(needed.items())},
            code_version=version,
            files=files,
            metrics=metrics,
            wall_time_s=round(wall, 3),
            digest=files_digest(files),
        )
        return store.publish(scratch, manifest), wall
    except BaseException:
        store.discard(scratch)
        raise


def _committed_by_rank_zero(call: StageCall, store: Store, key: str) -> Manifest:
    """The output the node with global rank 0 commits, once it is in the shared store.

    That node trained alongside this one and is hashing (or uploading) the files now; it has
    ``lease_s`` × 5 to finish, after which this node fails with what to do.
    """
    deadline = time.monotonic() + call.lease_s * 5
    delay = 0.25
    while (manifest := store.find(call.stage, key)) is None:
        if time.monotonic() > deadline:
            raise ArtifactError(
                f"stage {call.stage}: this node's ranks finished, but the node with rank 0 did not publish "
                f"key {key} within {call.lease_s * 5:.0f}s; see that node's log, then rerun the same command on every node"
            )
        time.sleep(delay)
        delay = min(5.0, delay * 1.5)
    log.info("stage %s: the node with rank 0 published %s", call.stage, store.ref(manifest).uri)
    return manifest


def _launch(
    call: StageCall, key: str, inputs: dict[str, Path], scratch: Path, tracker: Tracker
) -> dict[str, Any] | None:
    """Run the stage's code: here, or under torchrun when its own section asks for several processes
    (``None``: another node of a multi-node run holds rank 0 and commits)."""
    sections = call.sections()
    extra = run_extras(call, key)
    if launchers.needs_torchrun(call.declared, sections):
        return launchers.run_torchrun(call, scratch, getattr(tracker, "run_id", None), extras=extra)
    return call.declared.run(sections, inputs, scratch, tracker, **extra) or {}


def run_extras(call: StageCall, key: str) -> dict[str, str]:
    """What a stage's ``run`` takes besides its sections, inputs and directory: where it keeps state
    across attempts that another machine must reach (the data stage's units; a training stage's
    checkpoint mirror beside an ``s3://`` store)."""
    from stages.training.checkpoint_mirror import mirror_uri

    extra = {"work": work_location(call, key)} if call.declared.keeps_work else {}
    if call.declared.trains and (mirror := mirror_uri(call.store, call.stage, key)):
        extra["checkpoint_mirror"] = mirror
    return extra


def work_location(call: StageCall, key: str) -> str:
    """Where a stage keeps state across attempts at ``key`` that remote workers must reach: beside
    an s3:// store's outputs (a Dask cluster's workers reach only the store), else under the store."""
    return f"{call.store.rstrip('/')}/{call.stage}/.units-{key}"


def _check_headline(declared: Stage, metrics: dict[str, Any]) -> None:
    """The report card shows the declared headline; a stage that stops reporting one is a bug here."""
    missing = [name for name in declared.headline if name not in metrics]
    if missing:
        raise ArtifactError(
            f"stage {declared.name} reported no {', '.join(missing)}, which its STAGE declares as headline metrics"
        )


@contextlib.contextmanager
def _stage_run(call: StageCall, config: Callable[[], dict[str, Any]], tracker: Tracker | None):
    """The stage's MLflow run for the length of the block (or the given tracker, or an in-memory one)."""
    if tracker is not None or call.tracking is None:
        yield tracker or MemoryTracker()
        return
    from stages.core.tracking import stage_run

    tracking = call.tracking
    with stage_run(
        tracking.uri,
        call.stage,
        parent_run_id=tracking.parent_run_id,
        run_id=tracking.run_id,
        tags=tracking.tags,
        params=config,
    ) as run_tracker:
        yield run_tracker


def _system_metrics(call: StageCall, tracker: Tracker) -> Any:
    """``system/*`` samples around a training stage that has an MLflow run."""
    interval = call.tracking.system_metrics_interval_s if call.tracking else 0.0
    if not call.declared.trains or interval <= 0 or not hasattr(tracker, "run_id"):
        return contextlib.nullcontext()
    from stages.core.tracking import SystemMetrics

    return SystemMetrics(tracker, interval)


_LOGGED_SUFFIXES = {".json", ".md", ".png", ".svg", ".vocab", ".model", ".txt", ".jsonl"}


def _log_outputs(tracker: Any, name: str, result: StageResult, store: Store) -> None:
    """The manifest, numeric metrics and small files of the output, into the stage's MLflow run."""
    manifest = result.manifest
    numeric = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"{name}.{k}": v for k, v in numeric.items()})
    tracker.log_metrics({"wall_time_s": result.wall_time_s})
    tracker.log_text(manifest.to_json(), MANIFEST)
    local = _local_copy(store, result)
    if local is None:  # reused from S3 and not cached here: the manifest says what it holds
        return
    for path in sorted(local.glob("*")):
        small = path.is_file() and path.stat().st_size < 5_000_000 and path.name != MANIFEST
        if small and path.suffix in _LOGGED_SUFFIXES:
            tracker.log_artifact(path, "outputs")


def _local_copy(store: Store, result: StageResult) -> Path | None:
    """The output's files on this machine without downloading: a local store's directory, or the
    S3 store's cached copy of an output this process just built."""
    if isinstance(store, LocalStore):
        return Path(result.ref.uri)
    cache = getattr(store, "cache", None)
    if cache is not None and cache.find(result.manifest.stage, result.manifest.key) is not None:
        return cache.location(result.manifest.stage, result.manifest.key)
    return None
