from collections import Counter
from datetime import UTC, date, datetime

import pytest

from tsubasa.memory.dates import human_date, resolve_relative
from tsubasa.memory.guards import ObservationGuard
from tsubasa.memory.observe import ExtractionStats, parse_observations
from tsubasa.schema import Turn

REPORT = date(2023, 5, 8)  # a Monday


@pytest.mark.parametrize("text,new,when", [
    ("Caroline went to a support group yesterday.", "Caroline went to a support group on 7 May 2023.",
     date(2023, 5, 7)),
    ("Melanie painted a sunrise last year.", "Melanie painted a sunrise in 2022.", date(2022, 1, 1)),
    ("Last week Caroline ran a race.", "The week before 8 May 2023 Caroline ran a race.", date(2023, 5, 1)),
    ("Caroline went camping last Saturday.", "Caroline went camping the Saturday before 8 May 2023.",
     date(2023, 5, 6)),
    ("Caroline moved 4 years ago from Sweden.", "Caroline moved 4 years before 8 May 2023 from Sweden.",
     date(2019, 5, 9)),
    ("Melanie will go camping next month.", "Melanie will go camping in June 2023.", date(2023, 6, 1)),
    ("Caroline likes pottery.", "Caroline likes pottery.", None),
])
def test_relative_dates_are_rewritten_the_way_locomo_phrases_them(text, new, when):
    assert resolve_relative(text, REPORT) == (new, when)


def test_human_date_ignores_the_locale():
    assert human_date(date(2023, 12, 1)) == "1 December 2023"


def _turns() -> list[Turn]:
    lines = [("Caroline", "I went to a LGBTQ support group yesterday and it was so powerful."),
             ("Melanie", "I'm swamped with the kids and work. I ran a charity race last Saturday."),
             ("Caroline", "I'm researching adoption agencies, it's been a dream to have a family.")]
    ts = datetime(2023, 5, 8, 13, tzinfo=UTC)
    return [Turn(event_id=f"e{i}", tenant_id="t", user_id="u", session_id="s1", speaker=sp, text=tx, timestamp=ts,
                 source_id=f"D1:{i + 1}", seq=i) for i, (sp, tx) in enumerate(lines)]


def test_guard_keeps_supported_facts_about_the_target_and_drops_the_rest():
    g, drop = ObservationGuard(_turns(), "Caroline"), Counter()
    assert g.check("Caroline is researching adoption agencies.", [], drop) == \
        "Caroline is researching adoption agencies."
    assert g.check("She went to a LGBTQ support group.", [], drop) == "Caroline went to a LGBTQ support group."
    assert g.check("Melanie ran a charity race.", [], drop) is None  # the other speaker's fact
    assert g.check("Caroline ran a charity race.", ["D1:2"], drop) is None  # cites only Melanie's turn
    assert g.check("Caroline adopted a grey cat named Luna in Denver.", [], drop) is None  # invented
    assert g.check("Caroline: I went to a support group", [], drop) is None  # a copied turn
    assert drop == Counter(other_speaker=1, other_speakers_turns=1, unsupported=1, copied_turn=1)
    assert g.third_person("Caroline ran a race. It was fun for her. Really made me think.") == \
        "Caroline ran a race. It was fun for her."


def test_parser_with_guard_rewrites_dates_and_stops_a_loop():
    turns = _turns()
    raw = "\n".join(["- Caroline went to a LGBTQ support group yesterday."]
                    + ["- Caroline is researching adoption agencies."] * 6)
    stats = ExtractionStats()
    obs = parse_observations(raw, [t.source_id for t in turns], REPORT, "Caroline", stats=stats,
                             guard=ObservationGuard(turns, "Caroline"))
    assert [o.text for o in obs] == ["Caroline went to a LGBTQ support group on 7 May 2023.",
                                     "Caroline is researching adoption agencies."]
    assert obs[0].event_date == date(2023, 5, 7) and obs[1].event_date == REPORT
    assert stats.dropped["repeat"] == 3 and stats.dropped["loop"] == 1
