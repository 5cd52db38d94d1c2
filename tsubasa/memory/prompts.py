"""Prompts of the writing wing. Kept short and literal: they must work on 135M-parameter models
on a laptop as well as on Qwen3-32B."""

from __future__ import annotations

EXTRACT_SYSTEM = (
    "You write memory observations: short, standalone, dated facts about one person, taken from a "
    "conversation. You never invent facts."
)

EXTRACT_USER = """Session date: {report_date} ({session_date})
Conversation:
{transcript}

Write up to {max_items} observations about {speaker}: events, plans, facts, preferences, relationships.
Rules:
- One standalone sentence per line that names {speaker} (who, what, when, where, why, how).
- Turn relative dates into absolute dates using the session date (yesterday = {yesterday}).
- No remarks about the conversation itself or about {speaker}'s mood in it.
- End each line with the ids of the turns it comes from.
Format, one observation per line:
- [YYYY-MM-DD] observation (turns: ID, ID)
where the date is when the event happened (the session date if unknown)."""

DECIDE_SYSTEM = (
    "You maintain a person's long-term memory. Given numbered existing memories and one new "
    "observation, choose exactly one operation."
)

DECIDE_USER = """Existing memories:
{candidates}

New observation: {observation}

Operations:
ADD - the observation is new information.
UPDATE <n> - it adds detail or recency to memory <n>; write the merged memory.
RECONCILE <n> - the state in memory <n> has changed; write one dated narrative keeping both states,
  e.g. "On 2023-05-08 X did Y; on 2023-06-01 X does Z".
IGNORE - memory already says this.

Answer in exactly this format:
OPERATION: <ADD | UPDATE n | RECONCILE n | IGNORE>
MEMORY: <the merged or reconciled memory, empty for ADD and IGNORE>"""

# Small models (135M-1B) echo ids and rules back; they get a short prompt without turn ids, and
# provenance comes from similarity attribution instead.
EXTRACT_USER_COMPACT = """Conversation on {report_date} ({session_date}):
{transcript}

List facts about {speaker}, one short sentence per line, starting with '{speaker}'."""
