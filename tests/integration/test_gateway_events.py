"""`POST /v1/events` through the gateway's FastAPI app (`create_app`, what the Serve ingress serves),
in process: real Milvus Lite, the real embedder and MemoryWriter; the writer's model replies are
scripted and never asked (no session is closed here). Text holding control characters is refused
with a reason naming the field and nothing of it reaches the raw log."""

from __future__ import annotations

import json

import pytest
from scripted import ScriptedEngine

pytestmark = pytest.mark.integration

KEY = "sk-acme-test"


class _NoLLM:
    async def stream(self, req):
        raise AssertionError("the events test sent a generation request")
        yield  # pragma: no cover


@pytest.fixture()
def gateway(settings):
    from fastapi.testclient import TestClient

    from services.serve.auth import APIKeyAuth, hash_key
    from services.serve.gateway import create_app
    from services.serve.serving import GatewayService
    from tsubasa.distill.adapters import registry_from_settings
    from tsubasa.memory.runtime import MemorySystem

    def words(text: str) -> int:
        return len(text.split())

    memory = MemorySystem(settings, engine=ScriptedEngine([]), count_tokens=words)
    service = GatewayService(settings, _NoLLM(), memory, registry_from_settings(settings), words, str)
    with TestClient(create_app(service, APIKeyAuth({hash_key(KEY): "acme"}))) as client:
        yield client, memory.store
    service.sessions.close()
    memory.store.close()


def _turn(event_id: str, text: str) -> dict:
    return {"event_id": event_id, "user_id": "alice", "session_id": "s1", "timestamp": "2024-03-01T10:00:00Z",
            "speaker": "Alice", "text": text}


def test_control_characters_in_text_are_refused_with_a_reason(gateway):
    client, store = gateway
    auth = {"Authorization": f"Bearer {KEY}"}
    events = [_turn("e1", "I adopted a cat named Miso"), _turn("e2", "nul\x00inside"),
              _turn("e3", "escape \x1b[31m red"), {**_turn("e4", "ok"), "speaker": "Al\x00ice"},
              _turn("e5", "tabs\tand\nnew lines\r are text")]
    r = client.post("/v1/events", json={"events": events}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["received"], body["accepted"], body["new_turns"]) == (5, 2, 2)
    errors = {e["event_id"]: e["error"] for e in body["errors"]}
    assert set(errors) == {"e2", "e3", "e4"}
    assert errors["e2"].startswith("text:") and "U+0000 at position 3" in errors["e2"]
    assert errors["e3"].startswith("text:") and "U+001B" in errors["e3"]
    assert errors["e4"].startswith("speaker:") and "U+0000" in errors["e4"]
    assert sorted(t.event_id for t in store.list_turns("acme", "alice")) == ["e1", "e5"]
    assert not any("\x00" in t.text or "\x1b" in t.text for t in store.list_turns("acme", "alice"))

    # a body whose JSON carries a raw NUL inside a string is not JSON at all: 400 with a reason
    raw = json.dumps({"events": [_turn("e6", "PLACEHOLDER")]}).replace("PLACEHOLDER", "raw\x00nul").encode()
    r = client.post("/v1/events", content=raw, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and "json" in r.json()["error"]["message"].lower(), r.text
    assert "e6" not in {t.event_id for t in store.list_turns("acme", "alice")}
