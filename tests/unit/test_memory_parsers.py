from datetime import date

import pytest

from tsubasa.memory.evolve import parse_decision
from tsubasa.memory.observe import ExtractionStats, parse_observations
from tsubasa.schema import EvolutionOp

KNOWN = ["D1:1", "D1:2", "D1:3"]
REPORT = date(2023, 5, 8)


def test_line_format_with_dates_and_provenance():
    raw = ("- [2023-05-07] Caroline attended an LGBTQ support group in Boston. (turns: D1:3)\n"
           "- [2023-05-08] Caroline plans to study counseling next year. (turns: D1:1, D1:2)\n")
    obs = parse_observations(raw, KNOWN, REPORT, "Caroline")
    assert [o.event_date for o in obs] == [date(2023, 5, 7), date(2023, 5, 8)]
    assert obs[0].source_ids == ["D1:3"] and obs[1].source_ids == ["D1:1", "D1:2"]
    assert obs[0].text == "Caroline attended an LGBTQ support group in Boston."


def test_json_format():
    raw = 'Here you go: [{"text": "Caroline adopted a dog named Max", "date": "2023-05-01", "turns": ["D1:2"]}]'
    stats = ExtractionStats()
    obs = parse_observations(raw, KNOWN, REPORT, "Caroline", stats=stats)
    assert stats.json_used and obs[0].source_ids == ["D1:2"] and obs[0].event_date == date(2023, 5, 1)


def test_relative_date_resolved_against_report_date():
    obs = parse_observations("Caroline went to a support group yesterday.", KNOWN, REPORT, "Caroline")
    assert obs[0].event_date == date(2023, 5, 7)


def test_speaker_prefixed_lines_are_reattributed():
    raw = "Melanie: I painted a sunrise by the lake last year.\nCaroline went hiking with her friends."
    obs = parse_observations(raw, KNOWN, REPORT, "Caroline", speakers=["Caroline", "Melanie"])
    assert [o.speaker for o in obs] == ["Melanie", "Caroline"]


MALFORMED = [
    "",
    "   \n\n  ",
    "[D1:1] [D2:1] [D3:1] [D4:1]",
    "{not json at all",
    '[{"text": 5}]',
    "- [YYYY-MM-DD] observation (turns: ID, ID)",
    "Caroline is supportive.",
    "This conversation was about painting and support groups overall.",
    "- [2023-13-45] Caroline moved to a new apartment in Denver. (turns: D9:9)",
    "ok",
    "\x00\x01 binary junk \ufffd",
    "- " + "word " * 200,
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_extractions_never_raise(raw):
    stats = ExtractionStats()
    obs = parse_observations(raw, KNOWN, REPORT, "Caroline", stats=stats)
    assert stats.kept == len(obs)
    for o in obs:  # whatever is kept is a usable observation
        assert len(o.text.split()) >= 4 and o.event_date is not None


def test_bad_date_keeps_text_and_unknown_ids_are_dropped():
    obs = parse_observations("- [2023-13-45] Caroline moved to a new apartment in Denver. (turns: D9:9)",
                             KNOWN, REPORT, "Caroline")
    assert obs[0].event_date == REPORT and obs[0].source_ids == []


def test_meta_and_duplicates_dropped():
    stats = ExtractionStats()
    raw = "Caroline is very supportive of Melanie.\nCaroline joined a choir.\nCaroline joined a choir."
    obs = parse_observations(raw, KNOWN, REPORT, "Caroline", stats=stats)
    assert len(obs) == 1 and stats.dropped["duplicate"] == 1 and stats.dropped["meta"] == 1


@pytest.mark.parametrize("raw,op,target,text", [
    ("OPERATION: ADD\nMEMORY:", EvolutionOp.ADD, None, ""),
    ("OPERATION: UPDATE 2\nMEMORY: Caroline adopted two dogs, Max and Bo.", EvolutionOp.UPDATE, 2,
     "Caroline adopted two dogs, Max and Bo."),
    ("OPERATION: RECONCILE 1\nMEMORY: On 2023-05-01 X lived in Boston; on 2023-07-01 X lives in Denver.",
     EvolutionOp.RECONCILE, 1, "On 2023-05-01 X lived in Boston; on 2023-07-01 X lives in Denver."),
    ('{"operation": "update", "index": 3, "memory": "merged text here now"}', EvolutionOp.UPDATE, 3,
     "merged text here now"),
    ("I think we should IGNORE this one.", EvolutionOp.IGNORE, None, ""),
    ("operation: reconcile #2\nmemory: both states kept in one line", EvolutionOp.RECONCILE, 2,
     "both states kept in one line"),
])
def test_parse_decision_shapes(raw, op, target, text):
    d = parse_decision(raw, n_candidates=3)
    assert d is not None and (d.op, d.target, d.text) == (op, target, text)


@pytest.mark.parametrize("raw", ["", "The new memory is: something", "UPDATE 9\nMEMORY: x y z w",
                                 "RECONCILE\nMEMORY: no index given here", '{"operation": "MERGE"}', "\x00"])
def test_parse_decision_unusable(raw):
    assert parse_decision(raw, n_candidates=3) is None
