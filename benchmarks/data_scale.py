"""Tokenizer and data stages on synthetic corpora of 100 MB and 1 GB: memory, speed, and the limit.

    nice -n 10 python benchmarks/data_scale.py --sizes 100 1000 --workdir /tmp/gptpipe-scale

For each size (MB) a deterministic corpus is generated offline (shuffled lines of the Python
standard library's own sources, as ~150 KB text files, and optionally the same text as one
Parquet file of several row groups). The tokenizer stage and then the data stage run in their own
processes (``python -m stages``), exactly as a container runs them; a sampler reads the resident
memory of each one's whole process tree (stage process + worker processes). Printed per size:

* peak RSS of the process tree, per stage;
* MB/s of source text through each stage (end to end, process start to exit);
* the limit: plain ``SentencePieceProcessor.encode`` of the same documents, already in memory,
  in as many processes as the data stage has workers (one thread each), and the data stage's
  throughput as a ratio of it.

The issue's targets on 2 cores: peak RSS at 1 GB <= 1 GB and within 1.25x of the 100 MB peak;
data-stage throughput >= 0.8x the plain-encode limit. This script prints the figures; it does
not assert them (timings depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.lm.tokenizer import MODEL_FILE  # noqa: E402
from stages.storage.executors import all_cores  # noqa: E402
from stages.storage.rss import PeakRSS  # noqa: E402

FILE_BYTES = 150_000  # below corpus.max_doc_bytes, so every byte is tokenized (as in the plain-encode limit)


def stdlib_lines() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.glob("*.py")):
        lines.extend(line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    return lines


def make_corpus(directory: Path, total_bytes: int, seed: int = 0) -> Path:
    """Files of shuffled stdlib lines; skipped when a finished copy (``.done``) is there."""
    done = directory / ".done"
    if done.is_file() and int(done.read_text()) == total_bytes:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = [line + "\n" for line in stdlib_lines()]
    sizes = [len(line.encode("utf-8")) for line in lines]
    written = number = 0
    while written < total_bytes:
        picked, size = [], 0
        while size < min(FILE_BYTES, total_bytes - written):
            i = rng.randrange(len(lines))
            picked.append(lines[i])
            size += sizes[i]
        (directory / f"part_{number:05d}.txt").write_text("".join(picked), encoding="utf-8", newline="")
        written += size
        number += 1
    done.write_text(str(total_bytes))
    return directory


def make_parquet(corpus: Path, target: Path, row_group_files: int = 64) -> Path:
    """The corpus's files as rows of one Parquet file, ``row_group_files`` rows per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if target.is_file():
        return target
    files = sorted(corpus.glob("*.txt"))
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(target, schema) as writer:
        for start in range(0, len(files), row_group_files):
            texts = [p.read_text(encoding="utf-8") for p in files[start : start + row_group_files]]
            writer.write_table(pa.table({"text": texts}, schema=schema), row_group_size=row_group_files)
    return target


def run_stage(stage: str, source: Path, store: Path, sets: list[str], inputs: list[str]) -> dict:
    """One stage in its own process; peak RSS of its process tree sampled from here."""
    command = [
        sys.executable,
        "-m",
        "stages",
        stage,
        "--force",
        "--out",
        str(store),
        *[a for s in [f"corpus.source={source}", *sets] for a in ("--set", s)],
        *[a for i in inputs for a in ("--input", i)],
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakRSS(interval_s=0.1, pid=proc.pid) as peak:
        out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}); run it by hand: {' '.join(command)}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"result": result, "seconds": seconds, "peak_rss_mb": peak.bytes / 2**20}


def _encode_share(args: tuple) -> tuple[int, float]:
    model, files, barrier = args
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model, num_threads=1)
    docs = [Path(f).read_text(encoding="utf-8") for f in files]
    size = sum(len(d.encode("utf-8")) for d in docs)
    barrier.wait()
    started = time.perf_counter()
    for at in range(0, len(docs), 64):  # batches, as the data stage encodes chunks
        processor.encode(docs[at : at + 64])
    return size, time.perf_counter() - started


def plain_encode_limit(model: str, corpus: Path, processes: int, sample_bytes: int = 30_000_000) -> float:
    """MB/s of bare ``encode`` in ``processes`` processes, text preloaded: over the whole corpus,
    or an even sample of its files (every k-th) of about ``sample_bytes`` for larger ones."""
    files = [str(p) for p in sorted(corpus.glob("*.txt"))]
    every = max(1, round(sum(Path(f).stat().st_size for f in files) / sample_bytes))
    files = files[::every]
    shares = [files[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(processes)
    with context.Pool(processes) as pool:
        results = pool.map(_encode_share, [(model, share, barrier) for share in shares])
    return sum(size for size, _ in results) / 1e6 / max(seconds for _, seconds in results)


def interleaved_ratio(model: str, corpus: Path, files: int = 20, rounds: int = 5) -> dict:
    """One process each, alternating A/B rounds over the same files so a shared machine's load
    hits both alike: the data stage's unit path (read, split, encode, write shards) against bare
    ``encode`` of the same text already in memory. Returns median seconds and the throughput ratio."""
    import statistics
    import tempfile

    import sentencepiece as spm

    from stages.core.config import CorpusConfig
    from stages.storage.corpus import CorpusReading, Piece
    from stages.storage.unit_shards import process_unit
    from stages.storage.units import Unit

    chosen = sorted(corpus.glob("*.txt"))[:files]
    unit = Unit(0, tuple(Piece(str(f), f.stat().st_size, source_size=f.stat().st_size) for f in chosen))
    proto = Path(model).read_bytes()
    processor = spm.SentencePieceProcessor(model_proto=proto, num_threads=1)
    settings = {
        "seed": 1234,
        "val_fraction": 0.05,
        "shard_tokens": 50_000_000,
        "dtype": "uint16",
        "eos_id": processor.eos_id(),
        "tokenizer": "bench",
        "corpus": {},
    }
    docs = [f.read_text(encoding="utf-8") for f in chosen]
    stage_s, plain_s = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            process_unit(unit, CorpusReading.of(CorpusConfig(source=str(corpus))), settings, proto, work)
            stage_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for at in range(0, len(docs), 64):
            processor.encode(docs[at : at + 64])
        plain_s.append(time.perf_counter() - started)
    stage, plain = statistics.median(stage_s), statistics.median(plain_s)
    return {
        "interleaved_mb": round(unit.size / 1e6, 1),
        "unit_path_s": round(stage, 3),
        "plain_encode_s": round(plain, 3),
        "ratio_interleaved": round(plain / stage, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gptpipe-data-scale"))
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0 = all cores)")
    parser.add_argument(
        "--parquet", action="store_true", help="also run the data stage on the corpus as one Parquet file"
    )
    parser.add_argument(
        "--interleaved-only",
        type=Path,
        metavar="TOKENIZER_MODEL",
        help="only the interleaved A/B ratio, with this tokenizer.model, on the first --sizes corpus",
    )
    args = parser.parse_args()
    if args.interleaved_only:
        corpus = make_corpus(args.workdir / f"corpus-{args.sizes[0]}mb", args.sizes[0] * 1_000_000, seed=args.sizes[0])
        print(json.dumps(interleaved_ratio(str(args.interleaved_only), corpus)))
        return
    workers = args.workers or all_cores()
    sets = ["tokenizer.vocab_size=2048", "tokenizer.threads=2", f"data.workers={workers}"]
    rows = []
    for size in args.sizes:
        corpus = make_corpus(args.workdir / f"corpus-{size}mb", size * 1_000_000, seed=size)
        store = args.workdir / f"store-{size}mb"
        tokenizer = run_stage("tokenizer", corpus, store, sets, [])
        model = str(Path(tokenizer["result"]["uri"]) / MODEL_FILE)
        # The machine may be shared: measure the limit just before and just after the stage, average.
        before = plain_encode_limit(model, corpus, workers)
        data = run_stage("data", corpus, store, sets, [f"tokenizer={tokenizer['result']['uri']}"])
        after = plain_encode_limit(model, corpus, workers)
        limit = (before + after) / 2
        metrics = data["result"]["metrics"]
        source_mb = metrics["source_bytes"] / 1e6
        row = {
            "size_mb": size,
            "format": "files",
            "workers": workers,
            "units": metrics["units"],
            "tokenizer_peak_rss_mb": round(tokenizer["peak_rss_mb"], 1),
            "tokenizer_mb_per_s": round(source_mb / tokenizer["seconds"], 2),
            "tokenizer_sampled_fraction": tokenizer["result"]["metrics"]["sampled_fraction"],
            "data_peak_rss_mb": round(data["peak_rss_mb"], 1),
            "data_mb_per_s_end_to_end": round(source_mb / data["seconds"], 2),
            "data_mb_per_s_stage": metrics["mb_per_s"],
            "plain_encode_mb_per_s": round(limit, 2),
            "plain_encode_before_after": [round(before, 2), round(after, 2)],
            "ratio_end_to_end": round(source_mb / data["seconds"] / limit, 3),
            "ratio_stage": round(metrics["mb_per_s"] / limit, 3),
        }
        row.update(interleaved_ratio(model, corpus))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.parquet:
            table = make_parquet(corpus, args.workdir / f"corpus-{size}mb.parquet")
            pdata = run_stage("data", table, store, sets, [f"tokenizer={tokenizer['result']['uri']}"])
            pm = pdata["result"]["metrics"]
            prow = {
                "size_mb": size,
                "format": "parquet",
                "units": pm["units"],
                "data_peak_rss_mb": round(pdata["peak_rss_mb"], 1),
                "data_mb_per_s_end_to_end": round(table.stat().st_size / 1e6 / pdata["seconds"], 2),
                "train_tokens_equal_files_run": pm["train_tokens"] == metrics["train_tokens"],
            }
            print(json.dumps(prow), flush=True)
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        print(
            json.dumps(
                {
                    "peak_rss_growth_data": round(large["data_peak_rss_mb"] / small["data_peak_rss_mb"], 3),
                    "peak_rss_growth_tokenizer": round(
                        large["tokenizer_peak_rss_mb"] / small["tokenizer_peak_rss_mb"], 3
                    ),
                    "sizes_mb": [small["size_mb"], large["size_mb"]],
                }
            )
        )


if __name__ == "__main__":
    main()
