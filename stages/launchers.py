"""Run a stage's code as several processes under ``torchrun`` (DDP / FSDP2), for the executor.

The executor (``stages/executor.py``, which imports this module; the call itself is a
``stages.stage_call.StageCall``) has already found no finished output, opened the stage's
MLflow run and made a scratch directory; when the stage's own section asks for more than one
process it calls ``run_torchrun``, which runs

    torchrun --standalone --nproc_per_node N -m stages.launchers --call '<stage call JSON>' \\
        --scratch <dir> --status <file> [--run-id <the stage's MLflow run>]

(torchrun as ``python -m stages.torchrun_agent``: ``python -m torch.distributed.run``, the one in
this environment, ending without a traceback when it passes a stop on). Every rank runs the
stage's ``run`` on the same call; rank 0 writes the files and logs into the stage's run, and
writes a status file: the metrics, or the error it stopped on, typed (``preempted`` for a stop
request that left a checkpoint). The executor then hashes and commits the scratch directory, as
for a stage run in its own process. SIGTERM or SIGINT sent to the launching process is passed on
to torchrun, which passes it to every rank.

Multi-node: with ``nnodes`` > 1 the c10d rendezvous flags are used; every node must run the
same command with ``GPTPIPE_RDZV_ENDPOINT=host:port`` of a node all can reach and the same
``GPTPIPE_RDZV_ID`` (the call travels in the command line, so the command is the same on
every node); this module launches this node's share. The nodes hold the key's lease together
(``node_group`` names their run), every node reports, and the node that got global rank 0 (the
rendezvous decides which) commits: on every other node ``run_torchrun`` returns ``None``, and
its executor waits for that output to appear in the shared store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.errors import ConfigError, GptpipeError
from stages.core.stage import Sections, Stage
from stages.training.preemption import Preempted, forward_stop

if TYPE_CHECKING:
    from stages.stage_call import StageCall

log = logging.getLogger("gptpipe.launch")
ROOT = Path(__file__).resolve().parents[1]


def needs_torchrun(declared: Stage, sections: Sections) -> bool:
    """True when the stage's own section asks for several processes. The recipe's validation
    already refused that for any stage not declared ``torchrun``, before any stage ran."""
    own = sections._values.get(declared.name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False  # already one rank of a torchrun job (`torchrun -m stages NAME`): do not nest
    return declared.torchrun and (getattr(own, "nproc_per_node", 1) > 1 or getattr(own, "nnodes", 1) > 1)


def torchrun_args(section: Any, name: str, env: dict[str, str] | None = None) -> list[str]:
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


def node_group(declared: Stage, sections: Sections, env: dict[str, str] | None = None) -> str:
    """What the nodes of one multi-node run share, and no other run does: the rendezvous endpoint
    and id. Empty for a stage on one node (its lease is its own)."""
    env = os.environ if env is None else env
    own = sections._values.get(declared.name)
    if not needs_torchrun(declared, sections) or getattr(own, "nnodes", 1) <= 1:
        return ""
    return f"{env.get('GPTPIPE_RDZV_ENDPOINT', '')}/{env.get('GPTPIPE_RDZV_ID', 'gptpipe-' + declared.name)}"


def command_line(
    call: StageCall,
    scratch: Path,
    status: Path,
    run_id: str | None = None,
    env: dict[str, str] | None = None,
    extras: dict[str, str] | None = None,
) -> list[str]:
    """The full argv: torchrun's flags, then this module as every rank's entry point."""
    section = call.sections()._values[call.stage]
    cmd = [sys.executable, "-m", "stages.torchrun_agent", *torchrun_args(section, call.stage, env)]
    cmd += ["-m", "stages.launchers", "--call", json.dumps(call.to_dict(), sort_keys=True)]
    cmd += ["--scratch", str(scratch), "--status", str(status)]
    if run_id:
        cmd += ["--run-id", run_id]
    if extras:
        cmd += ["--extras", json.dumps(extras, sort_keys=True)]
    return cmd


def run_torchrun(
    call: StageCall,
    scratch: Path,
    run_id: str | None,
    env: dict[str, str] | None = None,
    extras: dict[str, str] | None = None,
) -> dict | None:
    """Run the call's stage under torchrun into ``scratch``; return rank 0's metrics or raise its error.

    ``None``: this node's ranks finished, and global rank 0 ran on another node of the run,
    which writes the files and commits them (only with ``nnodes`` > 1).
    """
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="gptpipe-launch-") as tmp:
        status = Path(tmp) / "status.json"
        cmd = command_line(call, scratch, status, run_id, child_env, extras)
        shown = [arg if not arg.startswith("{") else "<call>" for arg in cmd]
        log.info("stage %s: launching %s", call.stage, shlex.join(shown))
        # Its own session: a terminal's Ctrl-C reaches this process alone, which passes the stop on once
        # (torchrun passes it to every rank, which checkpoints); ranks' output goes straight to ours.
        child = subprocess.Popen(cmd, env=child_env, cwd=ROOT, start_new_session=True)
        with forward_stop(child):
            returncode = child.wait()
        report = json.loads(status.read_text(encoding="utf-8")) if status.is_file() else None
    another_node = report is not None and set(report) == {"node_rank"}  # rank 0 ran elsewhere
    if another_node and returncode == 0:
        log.info("stage %s: this node's ranks finished; node 0 of the run commits", call.stage)
        return None
    if report is None or (returncode != 0 and ("metrics" in report or another_node)):
        raise _no_report(call, returncode)
    if "metrics" in report:
        return report["metrics"]
    raise _error(report)


def _no_report(call: StageCall, returncode: int) -> GptpipeError:
    """A rank died without saying why (a crash, a kill, or, on several nodes, a lost peer)."""
    message = (
        f"stage {call.stage} under torchrun exited with status {returncode} without a report; see the worker log above"
    )
    if call.sections()._values[call.stage].nnodes > 1:
        message += "; if a node was lost, rerun the same command on every node: it resumes from the last checkpoint"
    return GptpipeError(message)


def _error(report: dict[str, Any]) -> GptpipeError:
    """The exception rank 0 stopped on, from its status file."""
    if report.get("preempted"):
        return Preempted(report["error"])
    error = GptpipeError(report["error"])
    error.transient = bool(report.get("transient"))
    return error


def _rank_main(argv: list[str] | None = None) -> int:
    """One rank: run the stage on the call; rank 0 writes the status file (and so does the first
    rank of every other node of a multi-node run, for its own node)."""
    from stages.core.tracking import MemoryTracker, attach_run
    from stages.stage_call import StageCall
    from stages.storage.stores import open_store

    parser = argparse.ArgumentParser(prog="python -m stages.launchers", description=__doc__.splitlines()[0])
    parser.add_argument("--call", required=True, help="the stage call as JSON")
    parser.add_argument("--scratch", required=True, help="the directory the stage writes its files into")
    parser.add_argument("--status", required=True, help="where this node's report goes: metrics or an error")
    parser.add_argument("--run-id", default=None, help="the stage's MLflow run, which rank 0 logs into")
    parser.add_argument(
        "--extras", default="{}", help="JSON of the stage's other run() arguments (executor.run_extras)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    main_rank = os.environ.get("RANK", "0") == "0"
    call = StageCall.from_dict(json.loads(args.call))
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    node_rank = int(os.environ.get("GROUP_RANK", "0"))
    node_reporter = bool(node_rank) and os.environ.get("LOCAL_RANK", "0") == "0"
    if node_reporter:
        # Another node holds global rank 0 and reports the metrics; this node's report says only
        # which node it was (worker ranks end inside the stage, so it is written before it runs).
        Path(args.status).write_text(json.dumps({"node_rank": node_rank}), encoding="utf-8")
    report: dict[str, Any]
    try:
        store = open_store(call.store)
        inputs = {need: store.materialize(ref) for need, ref in call.inputs.items()}
        tracker = attach_run(call.tracking.uri, args.run_id) if args.run_id and main_rank and call.tracking else None
        extras = json.loads(args.extras)
        metrics = call.declared.run(call.sections(), inputs, scratch, tracker or MemoryTracker(), **extras)
        report = {"metrics": metrics or {}}
    except Preempted as exc:
        report = {"error": str(exc), "preempted": True, "transient": True}
    except GptpipeError as exc:
        report = {"error": str(exc), "transient": bool(getattr(exc, "transient", False))}
    if main_rank or (node_reporter and "error" in report):
        Path(args.status).write_text(json.dumps({**report, "node_rank": node_rank}), encoding="utf-8")
    if "error" in report:  # the launching process says it once, as ``gptpipe: error: …``
        print(f"stage {call.stage}, rank {os.environ.get('RANK', '0')}: {report['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main())
