"""Where an export's time goes: run stage ``export`` on saved artifacts and print each format's write
and gate seconds and the serving timing's (the export's ``seconds`` metric), with the wall time.

    .venv/bin/python benchmarks/export_time.py configs/tiny.yaml <tokenizer artifact> <finetune artifact> <store>

Extra arguments are ``--set`` overrides (``export.quantized.enabled=false``). The export always
recomputes (``force``), into ``<store>``.
"""

from __future__ import annotations

import json
import sys
import time

from stages.core.config import load_config
from stages.executor import run_stage
from stages.storage.stores import LocalStore, ref_from_path


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        sys.exit(__doc__)
    recipe, tokenizer, finetune, store = argv[:4]
    cfg = load_config(recipe, [f"artifacts.store={store}", *argv[4:]])
    inputs = {"tokenizer": ref_from_path(tokenizer), "finetune": ref_from_path(finetune)}
    started = time.perf_counter()
    metrics = run_stage("export", cfg, inputs, LocalStore(store), force=True).manifest.metrics
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": round(wall, 2), "seconds": metrics["seconds"], "serve": metrics["serve"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
