"""gptpipe's processes let idle CPU threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose a
policy, and they set it before torch loads, which is when OpenMP reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli.main import prepare_environment
from flows.process_env import RUN_ENV
from stages.core.cpu_threads import WAIT_POLICY, wait_passively

ROOT = Path(__file__).resolve().parents[1]


def test_the_policy_is_passive_unless_the_user_chose_one():
    environ: dict[str, str] = {}
    wait_passively(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    wait_passively(chosen)
    assert chosen == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_cli_and_worker_runs_carry_it(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert WAIT_POLICY.items() <= RUN_ENV.items()


@pytest.mark.parametrize(
    "command", [["flows.cli.main", "config", "--config", "configs/micro.yaml"], ["stages", "pretrain"]]
)
def test_it_is_set_before_torch_loads(command):
    """In the command's own process, the policy is in the environment when torch first loads: during
    the command if it loads torch, or right after it (where a stage would load it)."""
    probe = f"import builtins, os, runpy, sys\nENTRY = {command[0]!r}\n" + (
        "real = builtins.__import__\n"
        "def watch(name, *args, **kwargs):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        builtins.__import__ = real\n"
        "        print('policy when torch loads:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = watch\n"
        "sys.argv = ['x', *sys.argv[2:]]\n"
        "try:\n"
        "    runpy.run_module(ENTRY, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import torch\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert "policy when torch loads: PASSIVE" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
