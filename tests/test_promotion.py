"""The promotion gate (``stages.serving.promotion``), the champion history it keeps, the tags a registered
version carries (``stages.serving.version_tags``) and how the report card shows the decision.

Certificate rows are built by the formats' own row functions (``stages.formats.*``) through
``certificate_rows``, so the gate reads exactly what an export writes; the registry-tag form is what
``certificate_tags`` writes on a version.
"""

from __future__ import annotations

import json

import pytest

from flows.prefect_artifacts import full_markdown
from flows.registration import decision_tags
from flows.report import render_report, report_markdown
from stages.core.config import RegistryConfig
from stages.formats.certificate import certificate_rows, certificate_tags
from stages.formats.format import GateResult
from stages.formats.genai_quantized import quality_row
from stages.formats.hf import transformers_row
from stages.serving.promotion import ALWAYS, FIRST, NEVER, champion_stack, decide, history_entry, rollback_target
from stages.serving.version_tags import recorded_decision, version_tags

GATE = RegistryConfig()  # promote=gate, exact_match_drop=0.02, bpb_rise=0.02


def hf_row(matches: int = 4, tokenizer: int = 65) -> dict:
    figures = {
        "max_abs_diff": 3e-7,
        "generation_matches": matches,
        "generation_prompts": 4,
        "tokenizer_matches": tokenizer,
        "tokenizer_texts": 65,
    }
    return transformers_row("hf/ (transformers)", figures)


def quantized_row(passed: bool) -> dict:
    figures = {
        "precision": "int4",
        "exact_match": 0.80 if not passed else 0.945,
        "exact_match_fp32": 0.970,
        "bpb": 2.3,
        "bpb_fp32": 2.2,
        "tolerance": {"exact_match_drop": 0.04, "bpb_rise": 0.05},
        "tokenizer_matches": 400,
        "tokenizer_texts": 400,
        "passed": passed,
        "reason": "" if passed else "exact match dropped 0.170 > 0.04",
    }
    return quality_row(figures)


def certificate(*rows: dict) -> list[dict]:
    """What the export stage puts in its metrics under ``certificate`` for these format rows."""
    return certificate_rows([GateResult({}, list(rows))], {"pytorch": 1.7, "hf/": 1.0}, "pytorch", prompts=4)


CERTIFIED = certificate(hf_row(), quantized_row(passed=True))


def scored(champion_em=0.967, challenger_em=0.967, champion_bpb=2.0, challenger_bpb=2.0) -> dict:
    return {
        "champion_exact_match": champion_em,
        "challenger_exact_match": challenger_em,
        "champion_frozen_bpb": champion_bpb,
        "challenger_frozen_bpb": challenger_bpb,
        "accuracy": challenger_em,
    }


# ---- the policies


def test_always_promotes_and_never_holds_for_review_whatever_the_figures():
    worse = scored(challenger_em=0.1, challenger_bpb=9.0)
    always = decide(RegistryConfig(promote="always"), worse, [], has_champion=True)
    assert (always.promote, always.label, always.reasons) == (True, "promote", [ALWAYS])
    never = decide(RegistryConfig(promote="never"), scored(), CERTIFIED, has_champion=False)
    assert (never.promote, never.label) == (False, "hold")
    assert never.reasons == ["registry.promote=never: waiting for review (gptpipe promote N)"] == [NEVER]


def test_the_first_version_becomes_champion_under_the_gate():
    first = decide(GATE, {}, [], has_champion=False)
    assert first.promote and first.reasons == [FIRST]


def test_the_gate_promotes_a_challenger_within_both_tolerances_and_says_what_held():
    decision = decide(GATE, scored(challenger_em=0.957, challenger_bpb=2.02), CERTIFIED, has_champion=True)
    assert decision.promote, decision.reasons
    em, bpb, cert = decision.reasons
    assert em == "exact match 0.957 vs champion 0.967: dropped 0.010 <= registry.exact_match_drop 0.02"
    assert bpb == "frozen-set bits per byte 2.0200 vs champion 2.0000: rose 1.00% <= registry.bpb_rise 0.02 (2%)"
    assert cert.startswith(
        "every export format certified (3 rows: PyTorch (reference), hf/ (transformers), genai-quantized/"
    )


def test_a_better_challenger_passes_with_its_gains_named():
    decision = decide(GATE, scored(challenger_em=1.0, challenger_bpb=1.9), CERTIFIED, has_champion=True)
    assert decision.promote
    assert (
        decision.reasons[0]
        == "exact match 1.000 vs champion 0.967: gained 0.033, within registry.exact_match_drop 0.02"
    )
    assert decision.reasons[1].endswith(": fell 5.00%, within registry.bpb_rise 0.02 (2%)")


def test_an_exact_match_drop_past_the_tolerance_holds_with_both_values_the_difference_and_the_tolerance():
    decision = decide(GATE, scored(challenger_em=0.4), CERTIFIED, has_champion=True)
    assert not decision.promote
    assert decision.reasons[0] == "exact match 0.400 vs champion 0.967: dropped 0.567 > registry.exact_match_drop 0.02"
    assert len(decision.reasons) == 3  # the checks that passed are listed too


def test_a_drop_of_exactly_the_tolerance_passes_despite_floating_point():
    assert 0.967 - 0.947 > 0.02  # what a plain comparison would get wrong
    assert decide(GATE, scored(challenger_em=0.947), CERTIFIED, has_champion=True).promote
    tighter = RegistryConfig(exact_match_drop=0.0)
    assert not decide(tighter, scored(challenger_em=0.966), CERTIFIED, has_champion=True).promote


@pytest.mark.parametrize(
    ("figures", "promote"),
    [
        (scored(challenger_em=0.946), False),  # 0.021 lost: just past the 0.02 drop
        (scored(champion_bpb=2.0, challenger_bpb=2.04), True),  # a 2% rise exactly (0.020000000000000018 in floats)
        (scored(champion_bpb=2.0, challenger_bpb=2.041), False),  # 2.05%: just past the 2% rise
    ],
)
def test_each_tolerance_edge(figures, promote):
    decision = decide(GATE, figures, CERTIFIED, has_champion=True)
    assert decision.promote is promote, decision.reasons


def test_a_relative_bpb_rise_past_the_tolerance_holds():
    decision = decide(GATE, scored(champion_bpb=2.0, challenger_bpb=2.1), CERTIFIED, has_champion=True)
    assert not decision.promote
    assert decision.reasons[1] == (
        "frozen-set bits per byte 2.1000 vs champion 2.0000: rose 5.00% > registry.bpb_rise 0.02 (2%)"
    )
    looser = RegistryConfig(bpb_rise=0.06)
    assert decide(looser, scored(champion_bpb=2.0, challenger_bpb=2.1), CERTIFIED, has_champion=True).promote


def test_a_champion_without_comparison_figures_holds_and_says_evaluate_did_not_score_it():
    decision = decide(GATE, {"accuracy": 0.9, "bits_per_byte": 2.0}, CERTIFIED, has_champion=True)
    assert not decision.promote
    em, bpb = decision.reasons[:2]
    assert em.startswith("exact match: a champion exists but evaluate gave no champion_exact_match / challenger_")
    assert "did not score the champion" in em and "holding" in em
    assert "champion_frozen_bpb / challenger_frozen_bpb" in bpb
    half = {k: v for k, v in scored().items() if k != "champion_frozen_bpb"}
    held = decide(GATE, half, CERTIFIED, has_champion=True)
    assert not held.promote and "evaluate gave no champion_frozen_bpb (" in held.reasons[1]


@pytest.mark.parametrize("figures", [scored(challenger_em=float("nan")), scored(champion_bpb=0.0)])
def test_figures_that_cannot_be_compared_hold(figures):
    decision = decide(GATE, figures, CERTIFIED, has_champion=True)
    assert not decision.promote
    assert any("not a number" in r or "cannot be compared" in r for r in decision.reasons), decision.reasons


# ---- the certificate


def test_an_uncertified_format_holds_naming_the_format_and_what_differed():
    decision = decide(GATE, scored(), certificate(hf_row(matches=3, tokenizer=64)), has_champion=True)
    assert not decision.promote
    assert (
        decision.reasons[2]
        == "export format hf/ (transformers) not certified: greedy identical 3/4; tokenizer identical 64/65"
    )


def test_a_quantized_twin_its_quality_gate_rejected_holds():
    decision = decide(GATE, scored(), certificate(hf_row(), quantized_row(passed=False)), has_champion=True)
    assert not decision.promote
    (reason,) = [r for r in decision.reasons if "not certified" in r]
    assert reason.startswith("export format genai-quantized/ (onnxruntime-genai int4) not certified: quality gate: ")
    assert "exact match dropped 0.170 > 0.04" in reason


def test_no_certificate_holds():
    decision = decide(GATE, scored(), [], has_champion=True)
    assert not decision.promote and decision.reasons[2].startswith("no equivalence certificate from the export")


def test_the_certificate_as_registry_tags_decides_the_same():
    good, bad = certificate_tags(CERTIFIED), certificate_tags(certificate(hf_row(matches=2)))
    assert all(key.startswith("gptpipe.certificate.") for key in good)
    assert decide(GATE, scored(), good, has_champion=True).promote
    held = decide(GATE, scored(), bad, has_champion=True)
    assert not held.promote and held.reasons[2] == "export format hf not certified: greedy identical 2/4"
    rejected = certificate_tags(certificate(quantized_row(passed=False)))
    assert not decide(GATE, scored(), rejected, has_champion=True).promote


# ---- the champion history


def moves(*pairs: tuple[str, str]) -> list[dict]:
    return [history_entry(version, by, f"because {version}") for version, by in pairs]


def test_history_entries_say_when_by_whom_and_why():
    entry = history_entry(3, "promote", "reviewed by hand")
    assert entry["version"] == "3" and entry["by"] == "promote" and entry["reason"] == "reviewed by hand"
    assert entry["at"].endswith("+00:00") and "T" in entry["at"]


def test_rollback_walks_back_through_the_champions_one_at_a_time():
    history = moves(("1", "gate"), ("2", "gate"), ("3", "gate"))
    assert rollback_target(history, "3") == "2"
    history += moves(("2", "rollback"))
    assert champion_stack(history) == ["1", "2"]
    assert rollback_target(history, "2") == "1"
    history += moves(("1", "rollback"))
    assert rollback_target(history, "1") is None
    assert rollback_target(moves(("1", "gate")), "1") is None
    assert rollback_target([], "1") is None


def test_rollback_undoes_a_promotion_by_hand_and_follows_an_alias_moved_elsewhere():
    history = moves(("1", "gate"), ("2", "gate"), ("1", "promote"))
    assert rollback_target(history, "1") == "2"
    # champion moved in the MLflow UI to 5: the last recorded champion is what it goes back to
    assert rollback_target(moves(("1", "gate"), ("2", "gate")), "5") == "2"


# ---- a version's tags


def test_version_tags_hold_numeric_evaluation_refs_and_lineage_with_this_runs_data_as_root():
    refs = {
        "data": {"stage": "data", "uri": "s3://b/store/data/k1", "digest": "d1"},
        "export": {"stage": "export", "uri": "/s/export/k2", "digest": "d2"},
    }
    evaluation = {**scored(), "samples": 2, "diagnosis": ["x"], "passed": True, "label": "a"}
    tags = version_tags(evaluation, refs, {"parent_version": "4"})
    assert tags["eval.champion_exact_match"] == "0.967" and tags["eval.samples"] == "2"
    assert not {"eval.diagnosis", "eval.passed", "eval.label"} & set(tags)
    assert json.loads(tags["gptpipe.ref.export"]) == refs["export"]
    assert tags["gptpipe.lineage.parent_version"] == "4"
    assert json.loads(tags["gptpipe.lineage.root_data"]) == refs["data"]
    inherited = json.dumps({"stage": "data", "uri": "s3://b/store/data/k0", "digest": "d0"})
    kept = version_tags({}, refs, {"gptpipe.lineage.root_data": inherited})
    assert kept["gptpipe.lineage.root_data"] == inherited


class _Version:
    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags


def test_a_recorded_decision_reads_back_from_the_version_tags():
    tags = decision_tags({"unchanged": False, "decision": "hold", "reasons": ["a", "b"], "compared_with": "2"})
    assert tags["gptpipe.promotion.decision"] == "hold"
    assert recorded_decision(_Version(tags)) == {"decision": "hold", "reasons": ["a", "b"], "compared_with": "2"}
    assert recorded_decision(_Version({})) == {"decision": None, "reasons": [], "compared_with": None}


# ---- the report card


def report(promotion: dict) -> dict:
    return {
        "recipe": "micro",
        "stages": {},
        "store": "/s",
        "tracking_uri": None,
        "registered_model": {"name": "gptpipe-micro", "version": promotion["version"], "reused": False},
        "promotion": promotion,
    }


def test_the_report_card_shows_the_decision_and_every_reason():
    held = decide(GATE, scored(challenger_em=0.4), CERTIFIED, has_champion=True)
    promotion = {
        "name": "gptpipe-micro",
        "version": "3",
        "policy": "gate",
        "decision": held.label,
        "reasons": held.reasons,
        "compared_with": "2",
        "unchanged": False,
    }
    text = render_report(report(promotion))
    assert "promotion: version 3 held as challenger, champion stays version 2 (registry.promote=gate; " in text
    assert "  - exact match 0.400 vs champion 0.967: dropped 0.567 > registry.exact_match_drop 0.02" in text
    markdown = report_markdown(report(promotion))
    assert "## Promotion" in markdown and "- exact match 0.400 vs champion 0.967: dropped 0.567" in markdown
    assert "## Promotion" in full_markdown(report(promotion))
    first = {**promotion, "decision": "promote", "reasons": [FIRST], "compared_with": None}
    assert "promotion: version 3 promoted to champion (registry.promote=gate; no champion to compare with)" in (
        render_report(report(first))
    )
    again = {**first, "unchanged": True}
    assert "promotion: existing version 3, decision unchanged (promote; no champion to compare with)" in (
        render_report(report(again))
    )
    unchanged_tags = decision_tags(again)
    assert unchanged_tags["gptpipe.promotion.decision"] == "unchanged"
    assert (
        json.loads(unchanged_tags["gptpipe.promotion.reasons"])[0] == "existing version 3, decision unchanged (promote)"
    )
