"""Seed a real Milvus Lite store with users' turns and memories for the distillation tests.

Rows are written through the store's own API (upsert_turns, write_memory) with real embeddings, as
the writing wing would leave them; only the text is fixed, so tests do not depend on a random model
producing sensible observations."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from tsubasa.schema import EvolutionOp, MemoryRecord, Turn, stable_id

FACTS = {
    "alice": ["Alice adopted a grey cat named Milo from the city shelter",
              "Alice runs a small bakery called Sweet Rolls in Denver",
              "Alice is training for the Boston marathon next spring",
              "Alice's sister Jo moved to Lisbon to study architecture",
              "Alice plays the cello in a community orchestra on Thursdays"],
    "bob": ["Bob repaired an old motorbike with his father in the garage",
            "Bob works as a nurse at the children's hospital in Leeds",
            "Bob started learning Japanese to visit Kyoto next year",
            "Bob's favourite band is a jazz trio from New Orleans",
            "Bob volunteers at the food bank every Saturday morning"],
}


def seed_user(store, embedder, tenant: str, user: str, facts: list[str] | None = None, day0: date = date(2023, 5, 1),
              updated: datetime | None = None) -> None:
    facts = facts or FACTS.get(user, FACTS["alice"])
    base = datetime(2023, 5, 1, 12, tzinfo=UTC)
    turns = []
    for i, fact in enumerate(facts):
        turns.append(Turn(event_id=f"{user}.e{i}", tenant_id=tenant, user_id=user, session_id=f"session_{i // 3 + 1}",
                          speaker=user.title(), text=f"Guess what: {fact}.", timestamp=base + timedelta(minutes=i),
                          source_id=f"D{i // 3 + 1}:{i % 3 + 1}", seq=i % 3, session_date=f"{day0 + timedelta(i)}"))
    store.upsert_turns(turns, embedder.embed([t.text for t in turns]))
    now = updated or datetime.now(UTC)
    for i, (fact, t) in enumerate(zip(facts, turns, strict=True)):
        rec = MemoryRecord(memory_id=stable_id(tenant, user, fact, prefix="m"), tenant_id=tenant, user_id=user,
                           text=fact, version=1, created_at=now, updated_at=now, last_op=EvolutionOp.ADD,
                           source_ids=[t.source_id], observation_ids=[f"o{i}"], event_date=day0 + timedelta(i))
        store.write_memory(rec, embedder.embed([fact])[0], EvolutionOp.ADD, f"o{i}")
