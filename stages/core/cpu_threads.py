"""How gptpipe's processes wait on their CPU threads: passively, so that a machine shared with
another run (a second ``make run``, the test suite, a notebook) is not spun away.

PyTorch's CPU wheels run their parallel regions on GNU OpenMP, whose idle threads spin a while
between regions before they sleep. With more busy threads than cores, the spinning takes the
cores the working threads need. Measured with ``benchmarks/cpu_wait_policy.py`` on 2 cores (the
default recipe's model, 2 threads per trainer, median of 3): two trainers side by side trained
1.90x faster together with ``OMP_WAIT_POLICY=PASSIVE`` (5,532 against 2,906 tokens/s); one trainer
alone lost 7 % (5,000 against 5,398). On a machine of its own, ``OMP_WAIT_POLICY=ACTIVE`` (or any
value) in the environment wins over this default.

OpenMP reads the variable once, when torch's libraries load, so it is set before anything
imports torch: by the ``gptpipe`` command, by ``python -m stages`` (a stage's container), in the
environment of the runs a Prefect worker starts (``flows.process_env.RUN_ENV``), and torchrun's workers
inherit it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def wait_passively(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put ``WAIT_POLICY`` in ``environ`` where the user has not chosen a policy."""
    for name, value in WAIT_POLICY.items():
        environ.setdefault(name, value)
