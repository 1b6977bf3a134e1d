"""torchrun's agent, as ``stages.launchers`` runs it: the same program, quiet on the stop it passes on.

``python -m stages.torchrun_agent ARGS`` is ``python -m torch.distributed.run ARGS`` (torchrun, the
one in this environment) with one difference. On SIGTERM or SIGINT torchrun's agent passes the
signal to every rank and then raises ``SignalException``, whose traceback Python prints under the
ranks' own report. That stop is expected: the ranks checkpoint, rank 0 writes the stop into its
status file, and the launching process says it in one line. So here the agent ends with the
status a process killed by that signal reports to a shell (128 + its number), without a traceback.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def run(argv: list[str] | None = None) -> int:
    """torchrun's ``main`` on ``argv``; a stop signal it received becomes an exit status."""
    try:
        main(argv)
    except SignalException as stop:
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run())
