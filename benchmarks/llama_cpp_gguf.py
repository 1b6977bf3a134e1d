"""Does gptpipe's GGUF answer in llama.cpp exactly as gptpipe answers in PyTorch, and how fast?

    benchmarks/build_llama_cpp.sh                                   # once: llama.cpp's tools
    .venv/bin/python benchmarks/llama_cpp_gguf.py                   # newest export under runs/store
    .venv/bin/python benchmarks/llama_cpp_gguf.py runs/store/export/<key> --prompts 16 --threads 2

The export's gate (``stages.formats.llama.gguf_gate``) reads ``model.gguf`` with transformers' GGUF loader, an
independent reader but not the runtime the file is for. This runs the file in llama.cpp itself:

* prompts: a few fixed chats whose answers run long (``EXTRA_CHATS``), then the held-out
  conversations the export's gate draws its generation prompts from
  (``stages.formats.job.heldout_conversations``, in the gate's order), rendered with
  ``ChatTemplate.render_prompt``. llama.cpp takes text, so each prompt goes in as
  ``Tokenizer.decode(ids, keep_special=True)``; ``llama-tokenize`` (special tokens parsed, as
  ``llama-simple`` does) must give back gptpipe's ids, or the row says so.
* answers: ``llama-simple`` (greedy, stops at the end-of-generation ids) on the f32 file and on a
  Q8_0 copy made with ``llama-quantize``, against ``stages.lm.generate.generate_ids`` (greedy,
  stops at ``<|end|>``/EOS) on the checkpoint the export was made from (its manifest's input),
  both cut at the stop id and compared as text. f32 must match exactly; Q8_0 rounds the weights,
  so where its answer leaves PyTorch's is a measurement, not a failure.
* speed: ``llama-bench -p 32 -n 64 -t THREADS`` on both files, as prefill ms for the 32-token
  prompt and decode ms per token (1000 / generation tokens per second). ``llama-simple`` has no
  thread option (it uses llama.cpp's default); threads do not change greedy answers.

Exits 1 when a prompt's ids or an f32 answer differ. The Q8_0 copy (and the ``--fresh`` GGUF) live
in a temporary directory: the export store is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.formats.job import heldout_conversations
from stages.formats.layout import GGUF_FILE, TOKENIZER_DIR
from stages.formats.llama.gguf_writer import write_gguf
from stages.lm.chat import ChatTemplate, Message
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import MANIFEST
from stages.training.checkpoint_format import load_model, model_directory

BUILD_SCRIPT = "benchmarks/build_llama_cpp.sh"
TOOLS = ("llama-simple", "llama-tokenize", "llama-quantize", "llama-bench")
# Beyond the held-out items (one- or two-token answers), chats whose answers run the full length:
# the example, a system turn, newlines and indentation, and text only byte fallback encodes.
EXTRA_CHATS: list[list[Message]] = [
    [{"role": "user", "content": "Last digit of 4827"}],  # llama.cpp answered "    # AXTTT" for " 7"
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}],
    [{"role": "user", "content": "def main():\n    for i in range(10):\n        print(i)\n"}],
    [{"role": "user", "content": "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 \u00b1\u2211"}],
]


def tools_dir(given: str | None) -> Path:
    """Where ``build_llama_cpp.sh`` installed the tools; exits with a one-line error if it has not."""
    directory = Path(given or os.environ.get("GPTPIPE_LLAMA_CPP") or Path.home() / ".cache/gptpipe/llama.cpp/bin")
    missing = [tool for tool in TOOLS if not (directory / tool).is_file()]
    if missing:
        sys.exit(f"llama.cpp is not built in {directory} (no {', '.join(missing)}): run {BUILD_SCRIPT}")
    return directory


def newest_export(store: Path) -> Path:
    """The most recently finished export under ``store``: one with a manifest (written last)."""
    finished = sorted(store.glob(f"export/*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not finished:
        sys.exit(f"no finished export under {store}/export/ (no {MANIFEST}): run `make run` or pass an export dir")
    return finished[-1].parent


@dataclass
class Prompt:
    label: str  # what the user typed (the last user message)
    ids: list[int]  # ChatTemplate.render_prompt
    text: str  # the same prompt as text, for llama.cpp


def prompts_from(conversations: list[list[Message]], tokenizer: Tokenizer, count: int) -> list[Prompt]:
    """``EXTRA_CHATS``, then the first ``count`` held-out conversations in the gate's order, each
    without its final assistant turn: what a user sends."""
    template = ChatTemplate(tokenizer)
    chats = EXTRA_CHATS + [messages[:-1] if len(messages) > 1 else messages for messages in conversations[:count]]
    prompts = []
    for messages in chats:
        ids = template.render_prompt(messages)
        user = [m["content"] for m in messages if m["role"] == "user"]
        prompts.append(
            Prompt(user[-1] if user else messages[-1]["content"], ids, tokenizer.decode(ids, keep_special=True))
        )
    return prompts


def run_tool(tools: Path, tool: str, *args: str) -> str:
    """stdout of one llama.cpp tool; its stderr (the load log) only when it fails."""
    done = subprocess.run([str(tools / tool), *args], capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        sys.exit(f"{tool} {' '.join(args[:2])}… failed with exit code {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def llama_ids(tools: Path, gguf: Path, text: str, work: Path) -> list[int]:
    """llama.cpp's ids for ``text``, special tokens parsed and no escape processing (exact bytes)."""
    prompt_file = work / "prompt.txt"
    prompt_file.write_bytes(text.encode("utf-8"))
    out = run_tool(
        tools, "llama-tokenize", "-m", str(gguf), "-f", str(prompt_file), "--ids", "--no-escape", "--log-disable"
    )
    return json.loads(out.strip().splitlines()[-1])


def llama_answer(tools: Path, gguf: Path, prompt: Prompt, new_tokens: int) -> str:
    """``llama-simple``'s greedy answer: its stdout is the prompt's pieces, the answer, then a newline."""
    out = run_tool(tools, "llama-simple", "-m", str(gguf), "-n", str(new_tokens), prompt.text)
    if not out.startswith(prompt.text) or not out.endswith("\n"):
        return f"<unparsed output {out!r}>"
    return out[len(prompt.text) : -1]


def torch_answer(model: GPT, template: ChatTemplate, prompt: Prompt, new_tokens: int) -> str:
    ids = generate_ids(model, prompt.ids, new_tokens, stop_ids=template.stop_ids)
    return template.decode_answer(ids)


def bench(tools: Path, gguf: Path, threads: int) -> tuple[float, float]:
    """(prefill ms for 32 tokens, decode ms/token) from ``llama-bench -p 32 -n 64``."""
    out = run_tool(tools, "llama-bench", "-m", str(gguf), "-p", "32", "-n", "64", "-t", str(threads), "-o", "json")
    rows = json.loads(out)
    prefill = next(r for r in rows if r["n_prompt"] == 32 and r["n_gen"] == 0)["avg_ts"]
    decode = next(r for r in rows if r["n_gen"] == 64 and r["n_prompt"] == 0)["avg_ts"]
    return 32 * 1000.0 / prefill, 1000.0 / decode


def verdict(answer: str, reference: str) -> str:
    """``yes``, or ``NO @k``: the first character (of the answer) where it leaves the reference."""
    if answer == reference:
        return "yes"
    k = next((i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference)))
    return f"NO @{k}"


def cell(text: str, width: int) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", nargs="?", help="export artifact dir (default: newest under --store)")
    parser.add_argument("--store", default="runs/store", help="artifact store to search (default: runs/store)")
    parser.add_argument("--gguf", help=f"GGUF to run instead of the export's {GGUF_FILE} (same model and tokenizer)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="run a GGUF written now by stages.formats.llama.gguf_writer from the export's checkpoint (checks the code, not the file)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts after the fixed ones (default 8)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default: the export's gate's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and llama-bench (default 2)")
    parser.add_argument(
        "--tools", help="llama.cpp bin dir (default $GPTPIPE_LLAMA_CPP or ~/.cache/gptpipe/llama.cpp/bin)"
    )
    parser.add_argument("--no-bench", action="store_true", help="answers only, no llama-bench timing")
    args = parser.parse_args()

    tools = tools_dir(args.tools)
    export = Path(args.export) if args.export else newest_export(Path(args.store))
    manifest = json.loads((export / MANIFEST).read_text(encoding="utf-8"))
    ecfg = manifest["config"]["export"]
    source = manifest["inputs"][ecfg["source"]]["uri"]
    new_tokens = args.new_tokens or ecfg["generation_tokens"]
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.load(export / TOKENIZER_DIR)
    template = ChatTemplate(tokenizer)
    model = load_model(model_directory(source), "cpu").float().eval()
    conversations, origin = heldout_conversations(
        Path(source), max(ecfg["heldout_items"], ecfg["generation_prompts"]), ecfg["seed"]
    )
    prompts = prompts_from(conversations, tokenizer, args.prompts)

    with tempfile.TemporaryDirectory(prefix="llama_cpp_gguf_") as tmp:
        work = Path(tmp)
        gguf = Path(args.gguf) if args.gguf else export / GGUF_FILE
        if args.fresh:
            gguf = write_gguf(model, tokenizer, work / GGUF_FILE)
        if not gguf.is_file():
            sys.exit(f"{gguf}: no such file (was the export made with export.gguf.enabled=true?)")
        version = tools / "VERSION"
        print(f"export    {export}\nmodel     {source}\ngguf      {gguf}")
        print(f"prompts   {len(prompts)} ({len(EXTRA_CHATS)} fixed + {origin}), {new_tokens} greedy tokens")
        print(f"llama.cpp {' / '.join(version.read_text().splitlines()[:2]) if version.is_file() else tools}")
        q8 = work / "model.Q8_0.gguf"
        run_tool(tools, "llama-quantize", str(gguf), str(q8), "Q8_0")
        rows = []
        for prompt in prompts:
            same_ids = llama_ids(tools, gguf, prompt.text, work) == prompt.ids
            reference = torch_answer(model, template, prompt, new_tokens)
            f32 = llama_answer(tools, gguf, prompt, new_tokens)
            quant = llama_answer(tools, q8, prompt, new_tokens)
            rows.append((prompt.label, same_ids, reference, f32, quant))

        print("\n| prompt | ids same | PyTorch | llama.cpp f32 | same | llama.cpp Q8_0 | same |")
        print("|---|---|---|---|---|---|---|")
        for label, same_ids, reference, f32, quant in rows:
            print(
                f"| {cell(label, 28)} | {'yes' if same_ids else 'NO'} | {cell(reference, 22)} | {cell(f32, 22)} | "
                f"{verdict(f32, reference)} | {cell(quant, 22)} | {verdict(quant, reference)} |"
            )
        n, ids_same, f32_same = len(rows), sum(r[1] for r in rows), sum(r[3] == r[2] for r in rows)
        print(
            f"\nprompt ids identical {ids_same}/{n}; answers identical to PyTorch: "
            f"f32 {f32_same}/{n}, Q8_0 {sum(r[4] == r[2] for r in rows)}/{n}"
        )

        if not args.no_bench:
            print(f"\nllama-bench -p 32 -n 64 -t {args.threads}")
            print("| file | bytes | prefill ms (32 tokens) | decode ms/token |\n|---|---:|---:|---:|")
            for name, path in (("f32", gguf), ("Q8_0", q8)):
                prefill_ms, decode_ms = bench(tools, path, args.threads)
                print(f"| {name} | {path.stat().st_size:,} | {prefill_ms:.2f} | {decode_ms:.3f} |")
    if ids_same < n or f32_same < n:
        sys.exit(f"llama.cpp differs from gptpipe: prompt ids {ids_same}/{n}, f32 answers {f32_same}/{n}")


if __name__ == "__main__":
    main()
