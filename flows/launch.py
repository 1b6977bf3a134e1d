"""Run a training stage under ``torchrun`` when its recipe asks for more than one process.

The flow calls ``run_stage_torchrun`` instead of ``stages.runner.run_stage`` when
``needs_torchrun(name, cfg)``: it writes the resolved recipe to a file and runs

    torchrun --standalone --nproc_per_node N -m stages pretrain --config <resolved.yaml> --input ...

(``python -m torch.distributed.run`` is torchrun itself, named by the interpreter so it is
the one in this environment). Every rank runs the ordinary stage entry point; rank 0 publishes
the artifact and prints its reference as JSON, which comes back here as a ``StageResult`` —
the same object ``run_stage`` returns, so the caller does not care how the stage ran.

Multi-node: with ``nnodes`` > 1 the c10d rendezvous flags are used; every node must run the
same command (``command_line`` prints it) with ``GPTPIPE_RDZV_ENDPOINT=host:port`` of a node
all can reach, and the same ``GPTPIPE_RDZV_ID``. This module launches this node's share.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from stages.core.config import PipelineConfig, TrainConfig
from stages.core.errors import ArtifactError, ConfigError, GptpipeError
from stages.registry import stage
from stages.runner import StageResult, find_finished, stage_inputs, stage_key
from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import open_store
from stages.training.loop import Preempted

log = logging.getLogger("gptpipe.launch")
ROOT = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "gptpipe: error: "


def needs_torchrun(name: str, cfg: PipelineConfig) -> bool:
    """True when stage ``name`` asks for several processes. The recipe's validation already
    refused that for any stage the registry does not mark ``torchrun``, before any stage ran."""
    section = getattr(cfg, name, None)
    return (
        stage(name).torchrun and isinstance(section, TrainConfig) and (section.nproc_per_node > 1 or section.nnodes > 1)
    )


def torchrun_args(section: TrainConfig, name: str, env: dict[str, str] | None = None) -> list[str]:
    """torchrun's own flags: standalone on one node, c10d rendezvous across several."""
    env = os.environ if env is None else env
    args = [f"--nproc_per_node={section.nproc_per_node}"]
    if section.nnodes == 1:
        return ["--standalone", *args]  # a free local port per launch: parallel jobs do not collide
    endpoint = env.get("GPTPIPE_RDZV_ENDPOINT", "")
    if not endpoint:
        raise ConfigError(
            f"{name}.nnodes = {section.nnodes}: set GPTPIPE_RDZV_ENDPOINT=host:port (a node every node can reach) "
            "and run the same command on every node"
        )
    return [
        *args,
        f"--nnodes={section.nnodes}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={env.get('GPTPIPE_RDZV_ID', 'gptpipe-' + name)}",
    ]


def command_line(
    name: str,
    cfg: PipelineConfig,
    config_file: Path,
    inputs: dict[str, ArtifactRef],
    tracking_uri: str | None = None,
    run_id: str | None = None,
    force: bool = False,
    env: dict[str, str] | None = None,
) -> list[str]:
    """The full argv: torchrun + ``-m stages NAME`` with the resolved recipe and input references.

    ``run_id`` is the stage's own MLflow run (opened by the caller): rank 0 logs into it.
    """
    section = getattr(cfg, name)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args(section, name, env),
        "-m",
        "stages",
        name,
        "--config",
        str(config_file),
    ]
    for need in stage_inputs(name, cfg):
        cmd += ["--input", f"{need}={inputs[need].uri}"]
    if tracking_uri and run_id:
        cmd += ["--tracking-uri", tracking_uri, "--run-id", run_id]
    if force:
        cmd.append("--force")
    return cmd


def _tee(stream, sink, tail: collections.deque) -> None:
    """Copy a child's stderr to ours line by line (progress stays live), keeping the last lines."""
    for line in stream:
        sink.write(line)
        sink.flush()
        tail.append(line.rstrip("\n"))


def _failure(name: str, returncode: int, tail: collections.deque) -> GptpipeError:
    """The stage's own one-line error when a rank printed one, else torchrun's exit status."""
    errors = [line.split(ERROR_PREFIX, 1)[1] for line in tail if ERROR_PREFIX in line]
    if errors:
        message = errors[-1]
        return Preempted(message) if "stopped by SIGTERM" in message else GptpipeError(message)
    return GptpipeError(f"stage {name} under torchrun exited with status {returncode}; see the worker log above")


def run_stage_torchrun(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    tracking_uri: str | None = None,
    run_id: str | None = None,
    force: bool = False,
    env: dict[str, str] | None = None,
) -> StageResult:
    """Run stage ``name`` under torchrun (or reuse its finished output) and return its result.

    With ``tracking_uri`` and ``run_id`` (the stage's MLflow run, which the caller opened and
    closes), rank 0 logs its curves into that run.
    """
    store = open_store(cfg.artifacts.store)
    finished = None if force else find_finished(name, cfg, inputs, store)
    if finished is not None:  # torchrun not needed
        return finished

    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="gptpipe-launch-") as tmp:
        config_file = Path(tmp) / f"{cfg.name}-resolved.yaml"
        config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        cmd = command_line(name, cfg, config_file, inputs, tracking_uri, run_id, force, child_env)
        log.info("stage %s: launching %s", name, shlex.join(cmd))
        started = time.perf_counter()
        tail: collections.deque = collections.deque(maxlen=200)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env, cwd=ROOT)
        reader = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, tail), daemon=True)
        reader.start()
        stdout = proc.stdout.read()
        returncode = proc.wait()
        reader.join(timeout=10)
    if returncode != 0:
        raise _failure(name, returncode, tail)

    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    try:
        reference = json.loads(printed[-1])
    except (IndexError, json.JSONDecodeError):
        raise ArtifactError(f"stage {name} under torchrun printed no artifact reference on stdout") from None
    key = stage_key(name, cfg, inputs)
    manifest = store.find(name, key)  # what rank 0 published (not a reuse check: it ran just now)
    if manifest is None:
        raise ArtifactError(
            f"stage {name} under torchrun reported {reference.get('uri')} but the store holds no "
            f"output for key {key}; was artifacts.store reachable from every node?"
        )
    return StageResult(
        store.ref(manifest), manifest, reused=bool(reference.get("reused")), wall_time_s=time.perf_counter() - started
    )
