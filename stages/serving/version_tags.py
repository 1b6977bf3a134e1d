"""What a registered version says about itself, in MLflow tags: its evaluation, the stage outputs it
came from, its lineage and the promotion decision. The names live here once; the registry
(``stages.serving.model_registry``) writes them and the flows read them (the lineage of the next run).

* ``eval.<metric>``: each numeric figure of the evaluate stage (champion vs challenger figures too);
* ``gptpipe.ref.<stage>``: the JSON ArtifactRef (``{"stage", "uri", "digest"}``) of each stage output;
* ``gptpipe.lineage.parent_version`` / ``.parent`` / ``.root_data``: what the version continued from,
  and the data output whose ``val`` split is the lineage's frozen held-out set (this run's own data
  when it continues nothing);
* ``gptpipe.promotion.decision`` (``pending`` until the gate runs, then ``promote`` or ``hold``),
  ``.reasons`` (a JSON list) and ``.compared_with`` (the champion version, or ``none``);
  ``gptpipe.promotion.by`` / ``.at`` / ``.reason``: the last time the version became champion;
* on the registered model, ``gptpipe.promotion.history``: every move of ``champion``.
"""

from __future__ import annotations

import json
from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"
REF_TAG, LINEAGE_TAG, EVAL_TAG = "gptpipe.ref.", "gptpipe.lineage.", "eval."
ROOT_DATA_TAG = f"{LINEAGE_TAG}root_data"  # the data output whose val split is the lineage's frozen held-out set
DECISION_TAG = "gptpipe.promotion.decision"  # promote | hold (pending until the gate ran)
REASONS_TAG = "gptpipe.promotion.reasons"  # a JSON list of sentences
COMPARED_TAG = "gptpipe.promotion.compared_with"  # the champion version compared with, or "none"
HISTORY_TAG = "gptpipe.promotion.history"  # on the registered model: JSON list of champion moves
PENDING = "pending"
HISTORY_KEPT = 200  # entries: a registry tag holds 100,000 characters


def ref_json(ref: dict[str, str]) -> str:
    """An ArtifactRef dict as the one JSON form the lineage tags hold."""
    return json.dumps({key: ref[key] for key in ("stage", "uri", "digest")}, sort_keys=True)


def version_tags(
    evaluation: dict[str, Any], refs: dict[str, dict[str, str]], lineage: dict[str, str] | None = None
) -> dict[str, str]:
    """A new version's own story: ``eval.<metric>`` per numeric evaluate figure, ``gptpipe.ref.<stage>``
    per stage output of the run, and the lineage (``gptpipe.lineage.*``; a bare key gets the prefix).
    ``root_data`` defaults to this run's data output: a version that continues no one starts a lineage."""
    tags = {
        f"{EVAL_TAG}{key}": repr(float(value)) if isinstance(value, float) else str(value)
        for key, value in evaluation.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    tags.update({f"{REF_TAG}{stage}": ref_json(ref) for stage, ref in refs.items()})
    for key, value in (lineage or {}).items():
        tags[key if key.startswith(LINEAGE_TAG) else f"{LINEAGE_TAG}{key}"] = str(value)
    if ROOT_DATA_TAG not in tags and "data" in refs:
        tags[ROOT_DATA_TAG] = ref_json(refs["data"])
    return tags


def recorded_decision(version: Any) -> dict[str, Any]:
    """The promotion decision tags a version carries: decision (None when it has none), reasons, compared_with."""
    tags = version.tags or {}
    try:
        reasons = json.loads(tags.get(REASONS_TAG, "[]"))
    except ValueError:
        reasons = [tags[REASONS_TAG]]
    compared = tags.get(COMPARED_TAG)
    return {
        "decision": tags.get(DECISION_TAG),
        "reasons": reasons,
        "compared_with": None if compared == "none" else compared,
    }
