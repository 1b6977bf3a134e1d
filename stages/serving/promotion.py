"""Who holds the registered model's ``champion`` alias: the gate's decision and the history of moves.

Plain Python, no MLflow (``stages.serving.model_registry`` moves the aliases and writes the tags).

``decide`` is the promotion gate (``registry.promote``):

* ``gate`` promotes the first version of a model (there is no champion to compare with), and any
  later version only when, on the same held-out material the evaluate stage scored both on, its task
  exact match lost at most ``registry.exact_match_drop`` (absolute) against the champion's, its bits
  per byte on the lineage's frozen held-out text rose at most ``registry.bpb_rise`` (relative), and
  every row of the export's equivalence certificate is certified. Comparison figures that are missing
  (evaluate did not run, or did not score the champion) hold the version: nothing says it is better.
* ``always`` promotes; ``never`` holds every version for a person (``gptpipe promote N``).

A decision lists every reason, a passing one too (what held), each naming the figure, both values,
the difference and the tolerance, so the report card and the registry tags explain themselves.

The history is a list of ``{version, at, by, reason}`` entries, one per move of ``champion`` (``by``:
``gate``, ``promote`` or ``rollback``); ``rollback_target`` reads it as a stack to find the version
that held the alias before the current one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stages.core.config import RegistryConfig

NEVER = "registry.promote=never: waiting for review (gptpipe promote N)"
ALWAYS = "registry.promote=always: promoted without comparing it with the champion"
FIRST = "no champion yet: the first version becomes champion"
# The evaluate stage's comparison figures (flat keys of its metrics when it scored a champion).
EXACT_MATCH = ("champion_exact_match", "challenger_exact_match")
FROZEN_BPB = ("champion_frozen_bpb", "challenger_frozen_bpb")
SLACK = 1e-9  # 0.967 - 0.947 is 0.02000000000000002 in floating point: still within a 0.02 drop
_FRACTION = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Decision:
    """The gate's answer: whether ``champion`` moves to the new version, and why (every check, passed or not)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "promote" if self.promote else "hold"


def decide(policy: RegistryConfig, evaluation: dict[str, Any], certificate: Any, has_champion: bool) -> Decision:
    """The promotion decision for a newly registered version (see the module docstring).

    ``evaluation`` is the evaluate stage's metrics (``{}`` when it did not run), ``certificate`` the
    export's certificate rows (a list of row dicts) or its registry tags (format -> one-line row).
    """
    if policy.promote == "always":
        return Decision(True, [ALWAYS])
    if policy.promote == "never":
        return Decision(False, [NEVER])
    if not has_champion:
        return Decision(True, [FIRST])
    checks = [_exact_match(evaluation, policy.exact_match_drop), _frozen_bpb(evaluation, policy.bpb_rise)]
    checks += _certified(certificate)
    return Decision(all(ok for ok, _ in checks), [reason for _, reason in checks])


def _figures(evaluation: dict[str, Any], keys: tuple[str, str], what: str) -> tuple[float, float] | str:
    """The (champion, challenger) pair, or the reason it cannot be compared."""
    missing = [key for key in keys if not isinstance(evaluation.get(key), (int, float))]
    if missing:
        return (
            f"{what}: a champion exists but evaluate gave no {' / '.join(missing)} (it did not run, or did not "
            "score the champion on the same material): holding until a person compares them"
        )
    champion, challenger = (float(evaluation[key]) for key in keys)
    if not (math.isfinite(champion) and math.isfinite(challenger)):
        return f"{what}: challenger {challenger} vs champion {champion} is not a number: holding"
    return champion, challenger


def _exact_match(evaluation: dict[str, Any], allowed: float) -> tuple[bool, str]:
    pair = _figures(evaluation, EXACT_MATCH, "exact match")
    if isinstance(pair, str):
        return False, pair
    champion, challenger = pair
    drop = champion - challenger
    ok = drop <= allowed + SLACK
    head = f"exact match {challenger:.3f} vs champion {champion:.3f}"
    if drop > SLACK:
        return ok, f"{head}: dropped {drop:.3f} {'<=' if ok else '>'} registry.exact_match_drop {allowed:g}"
    change = f"gained {-drop:.3f}" if drop < -SLACK else "unchanged"
    return True, f"{head}: {change}, within registry.exact_match_drop {allowed:g}"


def _frozen_bpb(evaluation: dict[str, Any], allowed: float) -> tuple[bool, str]:
    pair = _figures(evaluation, FROZEN_BPB, "frozen-set bits per byte")
    if isinstance(pair, str):
        return False, pair
    champion, challenger = pair
    head = f"frozen-set bits per byte {challenger:.4f} vs champion {champion:.4f}"
    if champion <= 0:
        return False, f"{head}: a champion figure of {champion} cannot be compared relatively: holding"
    rise = (challenger - champion) / champion
    ok = rise <= allowed + SLACK
    if rise > SLACK:
        return ok, f"{head}: rose {rise:.2%} {'<=' if ok else '>'} registry.bpb_rise {allowed:g} ({allowed:.0%})"
    change = f"fell {-rise:.2%}" if rise < -SLACK else "unchanged"
    return True, f"{head}: {change}, within registry.bpb_rise {allowed:g} ({allowed:.0%})"


def _unequal(cell: Any) -> bool:
    """A ``k/n`` cell with k < n (``—``, None and "gptpipe's own" are not comparisons)."""
    found = _FRACTION.match(str(cell)) if cell is not None else None
    return bool(found) and found.group(1) != found.group(2)


def _certificate_rows(certificate: Any) -> list[dict[str, Any]]:
    """Rows from the export's metrics as they are, or from registry tags (``greedy=4/4; tokenizer=65/65; ...``)."""
    if isinstance(certificate, dict):
        rows = []
        for name, line in certificate.items():
            cells = dict(part.split("=", 1) for part in str(line).split("; ") if "=" in part)
            quality = str(line) if "rejected" in str(line) else None
            rows.append({"format": name.removeprefix("gptpipe.certificate."), **cells, "quality": quality})
        return rows
    return list(certificate or [])


def _certified(certificate: Any) -> list[tuple[bool, str]]:
    """One check per uncertified row, or one passing check naming every certified format."""
    rows = _certificate_rows(certificate)
    if not rows:
        return [(False, "no equivalence certificate from the export: its formats are not known to be certified")]
    failed = []
    for row in rows:
        problems = [f"{what} identical {row[what]}" for what in ("greedy", "tokenizer") if _unequal(row.get(what))]
        if "rejected" in str(row.get("quality") or ""):
            problems.append(f"quality gate: {str(row['quality']).split('rejected', 1)[1].lstrip(': ')}")
        if problems:
            failed.append((False, f"export format {row['format']} not certified: {'; '.join(problems)}"))
    if failed:
        return failed
    return [(True, f"every export format certified ({len(rows)} rows: {', '.join(str(r['format']) for r in rows)})")]


# ---- the history of the champion alias


def history_entry(version: str, by: str, reason: str) -> dict[str, str]:
    """One move of ``champion``: to ``version``, now, ``by`` gate|promote|rollback, and why."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"version": str(version), "at": at, "by": by, "reason": reason[:1000]}


def champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """The versions that held ``champion`` in turn, a rollback undoing the move before it."""
    stack: list[str] = []
    for entry in history:
        version = str(entry.get("version"))
        if entry.get("by") == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != version:  # the alias went elsewhere meanwhile: follow the record
                stack.append(version)
        else:
            stack.append(version)
    return stack


def rollback_target(history: list[dict[str, Any]], current: str) -> str | None:
    """The version that held ``champion`` before ``current``; None when nothing did."""
    stack = champion_stack(history)
    while stack and stack[-1] == str(current):
        stack.pop()
    return stack[-1] if stack else None
