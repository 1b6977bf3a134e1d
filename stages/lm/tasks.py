"""Built-in fine-tuning data: small verifiable tasks in the chat format, no network needed.

Each task maps a seeded random draw to a ``(prompt, answer)`` pair whose answer is checked by
exact match. They are chosen so a ~3M-parameter GPT pretrained for minutes on Python source can
learn them in minutes of CPU fine-tuning: each answer is a short copy/reorder of symbols that
are all in the prompt (attention can find them) and nothing needs more than a handful of steps
of "reasoning".

Train and held-out items are disjoint *by content*: an item belongs to the held-out side iff a
hash of its task and prompt falls in the held-out bucket, whatever seed or count is asked for.
So no held-out prompt can ever appear in any training set the generator makes.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from stages.core.errors import ConfigError
from stages.lm.chat import END_TOKEN, Message

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
HELDOUT_BUCKETS = 10  # one bucket in ten of the prompt space is reserved for held-out items


@dataclass(frozen=True)
class TaskItem:
    task: str
    prompt: str
    answer: str

    def messages(self) -> list[Message]:
        # The answer is stored with a leading space. The tokenizer has no dummy prefix, so a
        # message's first word would otherwise be spelled with different pieces ("9", "la"+"vi")
        # than the same word inside the prompt ("▁9", "▁la"+"vi"), and copying a symbol from
        # the prompt would need a learned piece-to-piece map. Scoring ignores the space.
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": " " + self.answer}]


def _reverse(rng: random.Random) -> tuple[str, str]:
    symbols = [rng.choice(LETTERS + DIGITS) for _ in range(rng.randint(3, 6))]
    return "Reverse: " + " ".join(symbols), " ".join(reversed(symbols))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(DIGITS) for _ in range(rng.randint(3, 6))]
    return "Sort: " + " ".join(digits), " ".join(sorted(digits))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def _repeat(rng: random.Random) -> tuple[str, str]:
    word, times = _word(rng), rng.randint(2, 4)
    return f"Repeat {times} times: {word}", " ".join([word] * times)


def _digits(rng: random.Random) -> str:
    # Written without spaces: with split_digits every digit is exactly one token.
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))


def _last(rng: random.Random) -> tuple[str, str]:
    number = _digits(rng)
    return f"Last digit of {number}", number[-1]


# The number ends every prompt of the "last digit" family, so the digit to read always sits at
# the same distance from the answer: the tasks share one attention pattern and differ only in
# what is done with the digit. That is what lets a minutes-old model learn them in minutes.
def _last_plus(rng: random.Random) -> tuple[str, str]:
    number = _digits(rng)
    return f"Last digit plus 1 (mod 10) of {number}", str((int(number[-1]) + 1) % 10)


def _last_minus(rng: random.Random) -> tuple[str, str]:
    number = _digits(rng)
    return f"Last digit minus 1 (mod 10) of {number}", str((int(number[-1]) - 1) % 10)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"Add: {a} + {b}", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "repeat": _repeat,
    "add": _add,
    "last": _last,
    "last_plus": _last_plus,
    "last_minus": _last_minus,
}
# The default mix: learnable to >= 90 % exact match in a few minutes of CPU fine-tuning of the
# tiny recipe (see docs/recipes-and-results.md). reverse/sort/repeat/add are there for longer runs and bigger models.
DEFAULT_TASKS = ("last", "last_plus")


def is_heldout(task: str, prompt: str) -> bool:
    """The content rule that splits train from held-out (stable across runs and machines)."""
    digest = hashlib.sha256(f"{task}\n{prompt}".encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0


def check_tasks(names: list[str] | tuple[str, ...], field: str = "finetune.tasks") -> None:
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ConfigError(f"{field} = {list(names)!r}: choose one or more of {', '.join(TASKS)}")


def make_items(count: int, split: str, seed: int, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS) -> list[TaskItem]:
    """``count`` items of the ``split`` ("train" or "heldout"), tasks in round-robin order.

    Held-out items are unique (each one scored counts once); training items may repeat.
    """
    check_tasks(tasks)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_heldout = split == "heldout"
    # Separate streams per split, so asking for more training items never shifts held-out ones.
    rng = random.Random(f"{seed}:{split}")
    items: list[TaskItem] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise ConfigError(f"cannot draw {count} distinct {split} items from tasks {list(tasks)}; ask for fewer")
        task = tasks[len(items) % len(tasks)]
        prompt, answer = TASKS[task](rng)
        if is_heldout(task, prompt) != want_heldout:
            continue
        if want_heldout:
            if (task, prompt) in seen:
                continue
            seen.add((task, prompt))
        items.append(TaskItem(task, prompt, answer))
    return items


_SPACE = re.compile(r"\s+")


def normalize_answer(text: str, stops: tuple[str, ...] = (END_TOKEN,)) -> str:
    """Cut at the first stop string, collapse whitespace runs, strip the ends."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return _SPACE.sub(" ", text).strip()


def exact_match(prediction: str, reference: str, stops: tuple[str, ...] = (END_TOKEN,)) -> bool:
    return normalize_answer(prediction, stops) == normalize_answer(reference, stops)
