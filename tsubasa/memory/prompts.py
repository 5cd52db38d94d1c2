"""Prompts of the writing wing. Kept short and literal: they must work on 135M-parameter models
on a laptop as well as on Qwen3-32B."""

from __future__ import annotations

EXTRACT_SYSTEM = (
    "You keep a person's long-term memory. From a conversation you write short, standalone facts about "
    "one person, each naming them, with the details the conversation gives (who, what, when, where, why, "
    "how). You never invent anything and never describe the conversation itself."
)

# The transcript comes first and the speaker last, so the prompts for the two speakers of one session
# share their long prefix (llama.cpp's prompt cache re-reads only the tail). No turn ids in the
# transcript: a 1.5B writer shown "[D1:3] Caroline: ..." copies the turns instead of writing facts;
# provenance comes from similarity attribution (observe.py) instead.
EXTRACT_USER = """Conversation between {speakers} on {session_date}:
{transcript}

List what this conversation tells about {speaker}: events in {speaker}'s life, activities, plans, \
possessions, preferences, opinions, family, friends and pets. Only facts {speaker} states; \
{others}'s own life is not {speaker}'s.
Write short third-person sentences, one per line, each starting with "- {speaker}". Keep time \
words such as "yesterday" or "last week" as they are. At most {max_items} lines."""

DECIDE_SYSTEM = (
    "You maintain a person's long-term memory. Given numbered existing memories and one new "
    "observation, choose exactly one operation."
)

DECIDE_USER = """Existing memories:
{candidates}

New observation: {observation}

Operations:
ADD - the observation is new information: a different event, thing or person than every memory.
UPDATE <n> - it is about the same event or fact as memory <n> and adds detail or recency; write
  memory <n> with the new detail merged in.
RECONCILE <n> - the state in memory <n> has changed; write one dated narrative keeping both states,
  e.g. "On 8 May 2023 X did Y; on 1 June 2023 X does Z".
IGNORE - memory <n> already says this.

Answer in exactly this format:
OPERATION: <ADD | UPDATE n | RECONCILE n | IGNORE>
MEMORY: <the merged or reconciled memory, empty for ADD and IGNORE>"""

# Tiny models (135M, random test models) echo ids and rules back; they get a short prompt without
# turn ids, and provenance comes from similarity attribution instead.
EXTRACT_USER_COMPACT = """Conversation on {report_date} ({session_date}):
{transcript}

List facts about {speaker}, one short sentence per line, starting with '{speaker}'."""
