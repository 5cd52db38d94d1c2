"""The memory inspector end to end: the gateway's FastAPI app (`create_app`, the app the Serve ingress
serves) on uvicorn, real Milvus Lite, the real embedder, the tiny-qwen3 tokenizer counting tokens, the
real adapter registry; LoCoMo conv-26 sessions 1-4 posted through `POST /v1/events` and evolved by
the real MemoryWriter, whose *model* replies are scripted (tiny-qwen3 has random weights). Then the
JSON endpoints, the tenancy rules, and the page itself driven in headless Chromium (Debian's
`chromium` + `chromium-driver`; `make test` installs them where it can, the browser test skips
without them).

`TSUBASA_INSPECTOR_SCREENSHOT=docs/inspector.png` keeps the browser test's screenshot there."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

import httpx
import pytest
from scripted import ScriptedEngine
from testenv import MODEL_CACHE

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

USER = "conv-26"
# What the scripted writer "extracts" per (speaker, session): each line states what that speaker says
# in that session (the writer's guards check subject, support and speaker on them), and is written
# only from the part of the session that says it (the writer reads sessions in windows of turns),
# as a faithful model would: (line, words of its source turn).
FACTS = {
    ("Caroline", "8 May, 2023"): [
        ("Caroline went to a LGBTQ support group yesterday and it was so powerful.", "support group yesterday"),
        ("Caroline is keen on counseling or working in mental health.", "keen on counseling or")],
    ("Melanie", "8 May, 2023"): [("Melanie painted a lake sunrise last year.", "lake sunrise last year")],
    ("Caroline", "25 May, 2023"): [
        ("Caroline is researching adoption agencies to give a loving home to kids.", "Researching adoption agencies")],
    ("Caroline", "27 June, 2023"): [
        ("Caroline is thinking of working with trans people and supporting their mental health.",
         "working with trans people"),
        ("Caroline went to an LGBTQ+ counseling workshop last Friday.", "counseling workshop")],
}
MERGED = ("Caroline is keen on counseling or working in mental health and is thinking of working with trans "
          "people, supporting their mental health.")


def _model_reply(messages) -> str:
    text = messages[-1].content
    if "Existing memories:" in text:  # a decision: session 4's plan UPDATEs session 1's counseling memory
        new = text.split("New observation:", 1)[1]
        cands = re.findall(r"^(\d+)\. (.*)$", text.split("New observation:", 1)[0], re.M)
        target = next((n for n, line in cands if "counseling or working" in line), None)
        if "trans people" in new and target:
            return f"OPERATION: UPDATE {target}\nMEMORY: {MERGED}"
        return "OPERATION: ADD\nMEMORY:"
    for (speaker, day), lines in FACTS.items():
        if f"tells about {speaker}:" in text and f"on {day.split(',')[0]}" in text:
            transcript = text.split(f"List what this conversation tells about {speaker}")[0]
            return "\n".join(f"- {line}" for line, cue in lines if cue in transcript)
    return ""


class _NoLLM:
    """The inspector never generates; a chat request here would be a test bug."""

    async def stream(self, req):
        raise AssertionError("the inspector test sent a generation request")
        yield  # pragma: no cover


def _post_sessions(url: str, key: str, tenant: str, sessions: list[int], locomo_path: Path) -> None:
    from tsubasa.eval.locomo import get_conversation, session_events

    conv = get_conversation(USER, locomo_path)
    auth = {"Authorization": f"Bearer {key}"}
    for n in sessions:
        events = [e.model_dump(mode="json") for e in session_events(conv, conv.session(n), tenant, USER)]
        r = httpx.post(f"{url}/v1/events", json={"events": events}, headers=auth, timeout=60)
        assert r.status_code == 200 and not r.json()["errors"], r.text
    deadline = time.monotonic() + 300
    while (st := httpx.get(f"{url}/v1/users/{USER}", headers=auth).json())["pending_sessions"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert not st["failed_sessions"] and st["memories"] > 0, st


@pytest.fixture(scope="module")
def inspector(tmp_path_factory, locomo_path):
    import uvicorn

    from services.serve.auth import APIKeyAuth, hash_key
    from services.serve.gateway import create_app
    from services.serve.local import free_port
    from services.serve.serving import GatewayService
    from tsubasa.config import load_settings
    from tsubasa.distill.adapters import AdapterManifest, registry_from_settings
    from tsubasa.llm.models import load_tokenizer
    from tsubasa.memory.runtime import MemorySystem

    tmp = tmp_path_factory.mktemp("inspector")
    keys = {"acme": "sk-acme-" + secrets.token_hex(12), "globex": "sk-globex-" + secrets.token_hex(12)}
    # add_below_similarity -1: every observation with a neighbour is decided by the (scripted) manager.
    settings = load_settings(data_dir=tmp / "data", model={"name": "tiny-qwen3", "cache_dir": MODEL_CACHE},
                             milvus={"uri": str(tmp / "milvus.db")}, adapters={"root": str(tmp / "adapters")},
                             memory={"add_below_similarity": -1.0})
    tok = load_tokenizer("tiny-qwen3", MODEL_CACHE)

    def count(text: str) -> int:  # what the Gateway deployment counts with: the serving model's tokenizer
        return len(tok(text, add_special_tokens=False)["input_ids"])

    memory = MemorySystem(settings, engine=ScriptedEngine(_model_reply), count_tokens=count)
    registry = registry_from_settings(settings)
    service = GatewayService(settings, _NoLLM(), memory, registry, count, tok.decode)
    app = create_app(service, APIKeyAuth({hash_key(k): t for t, k in keys.items()}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="inspector-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    _post_sessions(url, keys["acme"], "acme", [1, 2, 3, 4], locomo_path)
    _post_sessions(url, keys["globex"], "globex", [1], locomo_path)  # the same user id, another person
    # The inspector reads manifests and the pointer, never weights: a placeholder file stands in for them.
    weights = tmp / "weights"
    weights.mkdir()
    (weights / "adapter_model.safetensors").write_bytes(b"placeholder")
    for d in (1, 5):
        registry.publish("acme", USER, weights, AdapterManifest(base_model="tiny-qwen3", rank=8, alpha=16, d=d,
                                                                 loss="topd_kl", data_hash=f"h{d}", n_examples=24,
                                                                 grounding_k=3))
    yield {"url": url, "keys": keys, "count": count, "service": service}
    server.should_exit = True
    thread.join(timeout=30)
    service.sessions.close()
    memory.store.close()


def _get(inspector, path: str, tenant: str | None = "acme", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {inspector['keys'][tenant]}"} if tenant else {}
    return httpx.get(f"{inspector['url']}{path}", headers=headers, timeout=60, **kw)


def _search(inspector, body: dict, tenant: str = "acme", user: str = USER) -> httpx.Response:
    return httpx.post(f"{inspector['url']}/v1/users/{user}/search", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {inspector['keys'][tenant]}"})


def test_json_shows_memories_history_provenance_and_sessions(inspector):
    users = _get(inspector, "/v1/users").json()
    assert users["tenant"] == "acme" and [u["user"] for u in users["items"]] == [USER]
    assert users["items"][0]["adapter"] == f"acme/{USER}/v0002"
    mems = _get(inspector, f"/v1/users/{USER}/memories").json()
    assert mems["total"] == 5, mems  # 6 observations, one of which UPDATEd the counseling memory
    updated = next(m for m in mems["items"] if m["versions"] == 2)
    assert updated["text"] == MERGED and updated["last_op"] == "UPDATE"
    detail = _get(inspector, f"/v1/users/{USER}/memories/{updated['id']}").json()
    assert [(v["version"], v["op"]) for v in detail["history"]] == [(1, "ADD"), (2, "UPDATE")]
    assert "keen on counseling" in detail["history"][0]["observation"]["text"]
    assert detail["history"][0]["observation"]["session_id"] == "session_1"
    assert "trans people" in detail["history"][1]["observation"]["text"]
    assert detail["history"][1]["observation"]["session_id"] == "session_4"
    assert detail["history"][1]["observation"]["decision"]["op"] == "UPDATE"
    turns = detail["provenance"]
    assert {t["session_id"] for t in turns} == {"session_1", "session_4"}, turns
    assert any("counseling" in t["text"] and t["session_date"] == "1:56 pm on 8 May, 2023" for t in turns)
    assert any("trans people" in t["text"] and t["session_date"] == "10:37 am on 27 June, 2023" for t in turns)
    assert not detail["missing_sources"]

    sessions = _get(inspector, f"/v1/users/{USER}/sessions").json()
    assert [(s["session_id"], s["turns"], s["state"]) for s in sessions["items"]] == [
        ("session_1", 18, "done"), ("session_2", 17, "done"), ("session_3", 23, "done"), ("session_4", 18, "done")]
    s4 = _get(inspector, f"/v1/users/{USER}/sessions/session_4").json()
    assert len(s4["turns"]) == 18 and s4["turns"][0]["source_id"] == "D4:1"
    plan = next(o for o in s4["observations"] if "trans people" in o["text"])
    assert (plan["memory_id"], plan["memory_version"], plan["decision"]["op"]) == (updated["id"], 2, "UPDATE")

    adapters = _get(inspector, f"/v1/users/{USER}/adapters").json()
    assert adapters["current"] == f"acme/{USER}/v0002"
    assert [(a["version"], a["current"], a["d"]) for a in adapters["items"]] == [(2, True, 5), (1, False, 1)]


def test_pages_walk_every_item_once(inspector):
    seen, offset = [], 0
    while offset is not None:
        page = _get(inspector, f"/v1/users/{USER}/memories", params={"limit": 1, "offset": offset}).json()
        assert page["limit"] == 1 and len(page["items"]) == 1
        seen.append(page["items"][0]["id"])
        offset = page["next_offset"]
    assert len(seen) == len(set(seen)) == page["total"] == 5
    page = _get(inspector, f"/v1/users/{USER}/sessions/session_1", params={"limit": 5, "offset": 15}).json()
    assert [t["source_id"] for t in page["turns"]] == ["D1:16", "D1:17", "D1:18"] and page["next_offset"] is None


def test_search_is_the_chat_grounding_with_its_token_cost(inspector):
    r = _search(inspector, {"query": "What career is Caroline thinking about?"}).json()
    assert r["k"] == 3 and r["adapter"] == f"acme/{USER}/v0002"  # the adapter's grounding_k, as chat uses
    assert len(r["items"]) == 3 and "counseling" in r["items"][0]["text"]
    assert r["items"][0]["text"].startswith("[")  # dated, as the answering model sees it
    assert r["text"] == "\n".join(f"- {it['text']}" for it in r["items"])
    assert r["tokens"] == inspector["count"](r["text"]) > 0
    grounding = inspector["service"].ground("acme", USER, r["query"], 3)  # the chat path's own call
    assert [it.id for it in grounding.items] == [it["id"] for it in r["items"]]
    assert grounding.tokens == r["tokens"]
    turns = _search(inspector, {"query": "support group", "k": 2, "source": "turns"}).json()
    assert turns["k"] == 2 and len(turns["items"]) == 2 and "support group" in turns["items"][0]["text"]


def test_other_tenants_and_bare_requests_are_refused(inspector):
    acme_mem = _get(inspector, f"/v1/users/{USER}/memories").json()["items"][0]["id"]
    other = f"acme:{USER}"
    paths = [f"/inspect/users/{other}", f"/v1/users/{other}/memories", f"/v1/users/{other}/memories/{acme_mem}",
             f"/v1/users/{other}/sessions", f"/v1/users/{other}/sessions/session_1", f"/v1/users/{other}/adapters"]
    for path in paths:
        r = _get(inspector, path, tenant="globex")
        assert r.status_code == 403 and "another tenant" in r.json()["error"]["message"], (path, r.text)
    assert _search(inspector, {"query": "support group"}, tenant="globex", user=other).status_code == 403
    # globex's own conv-26 is another person: none of acme's memories, and acme's memory id is not there
    theirs = _get(inspector, f"/v1/users/{USER}/memories", tenant="globex").json()
    assert theirs["tenant"] == "globex" and theirs["total"] == 3 and acme_mem not in {m["id"] for m in theirs["items"]}
    assert _get(inspector, f"/v1/users/{USER}/memories/{acme_mem}", tenant="globex").status_code == 404
    assert _get(inspector, f"/v1/users/{USER}/adapters", tenant="globex").json()["items"] == []

    for path in [f"/inspect/users/{USER}", "/inspect", *paths[1:], "/v1/users"]:
        r = _get(inspector, path, tenant=None)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    page = _get(inspector, f"/inspect/users/{USER}", tenant=None)
    assert 'id="api-key"' in page.text and "keen on counseling" not in page.text  # the bare shell asks for a key
    assert httpx.get(f"{inspector['url']}/inspect", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{inspector['url']}/v1/users/{USER}/search", json={"query": "x"}).status_code == 401
    ok = _get(inspector, f"/inspect/users/{USER}")
    assert ok.status_code == 200 and ok.text == page.text
    assert "script-src 'sha256-" in ok.headers["content-security-policy"]


def test_bad_input_gets_a_4xx_with_the_reason(inspector):
    cases = [(f"/v1/users/{USER}/memories?limit=0", 400, "limit"),
             (f"/v1/users/{USER}/memories?offset=-1", 400, "offset"),
             ('/v1/users/bad"id/memories', 400, "user_id"),
             (f"/v1/users/{USER}/memories/m%20x", 400, "memory_id"),
             (f"/v1/users/{USER}/memories/m0", 404, "memory_id"),
             (f"/v1/users/{USER}/sessions/session_9", 404, "session_id"),
             (f"/v1/users/{USER}/sessions/s'1", 400, "session_id")]
    for path, status, named in cases:
        r = _get(inspector, path)
        assert r.status_code == status and named in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], \
            (path, r.text)
    for body, named in [({"query": ""}, "query"), ({"query": "x", "k": 0}, "k"), ({"query": "x", "source": "all"},
                                                                                  "source")]:
        r = _search(inspector, body)
        assert r.status_code == 400 and named in r.json()["error"]["message"], r.text
    spec = httpx.get(f"{inspector['url']}/openapi.json").json()["paths"]
    for path in ["/inspect", "/inspect/users/{user_id}", "/v1/users", "/v1/users/{user_id}/memories",
                 "/v1/users/{user_id}/memories/{memory_id}", "/v1/users/{user_id}/sessions",
                 "/v1/users/{user_id}/sessions/{session_id}", "/v1/users/{user_id}/adapters",
                 "/v1/users/{user_id}/search"]:
        assert path in spec, path
    assert "limit" in {p["name"] for p in spec["/v1/users/{user_id}/memories"]["get"]["parameters"]}


def test_page_in_headless_chromium(inspector, browser, tmp_path):
    """Open acme's conv-26 in the page: another tenant's key first (the API's 403 shown, nothing else),
    then acme's; expand a memory's history and provenance, open a session, run a search, forget."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d, url, keys = browser, inspector["url"], inspector["keys"]
    wait = WebDriverWait(d, 60)

    def by_id(i):
        return d.find_element(By.ID, i)

    def use_key(key):
        by_id("api-key").send_keys(key, Keys.ENTER)

    d.get(f"{url}/inspect/users/acme:{USER}")
    use_key(keys["globex"])
    wait.until(lambda _: by_id("error").is_displayed() and "403" in by_id("error").text)
    assert "another tenant" in by_id("error").text and not by_id("user").is_displayed()
    assert "tenant globex" in by_id("tenant").text
    by_id("key-clear").click()

    d.get(f"{url}/inspect")
    use_key(keys["acme"])
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, f'#users a[data-user="{USER}"]'))
    d.find_element(By.CSS_SELECTOR, f'#users a[data-user="{USER}"]').send_keys(Keys.ENTER)  # the keyboard
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#memories li.memory")) == 5)
    assert d.current_url.endswith(f"/inspect/users/{USER}") and not by_id("error").is_displayed()
    assert d.execute_script("return [...document.querySelectorAll('input, select')].every(e => e.labels.length)")

    memory = next(li for li in d.find_elements(By.CSS_SELECTOR, "#memories li.memory")
                  if li.find_element(By.CLASS_NAME, "mtext").text == MERGED)
    assert "last operation UPDATE" in memory.text and "2 versions" in memory.text
    history = memory.find_element(By.CSS_SELECTOR, "details.history")
    history.find_element(By.TAG_NAME, "summary").send_keys(Keys.ENTER)
    wait.until(lambda _: "v2 UPDATE" in history.text)
    assert history.get_attribute("open") is not None and "v1 ADD" in history.text
    assert "keen on counseling" in history.text and "trans people" in history.text
    assert "decision UPDATE" in history.text and "session_4" in history.text
    provenance = memory.find_element(By.CSS_SELECTOR, "details.provenance")
    provenance.find_element(By.TAG_NAME, "summary").send_keys(Keys.SPACE)
    wait.until(lambda _: "8 May, 2023" in provenance.text)
    assert "27 June, 2023" in provenance.text and "working with trans people" in provenance.text

    d.find_element(By.CSS_SELECTOR, 'button[data-session="session_4"]').send_keys(Keys.ENTER)
    wait.until(lambda _: by_id("session").is_displayed() and len(by_id("session-turns").find_elements(
        By.TAG_NAME, "li")) == 18)
    assert "looking into counseling and mental health as a career" in by_id("session-turns").text
    assert "trans people" in by_id("session-obs").text and "v2" in by_id("session-obs").text
    rows = by_id("adapters").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 2 and rows[0].text.startswith(f"acme/{USER}/v0002 current")
    assert rows[1].text.startswith(f"acme/{USER}/v0001") and "current" not in rows[1].text

    question = "What career is Caroline thinking about?"
    by_id("search-q").send_keys(question, Keys.ENTER)
    wait.until(lambda _: "token" in by_id("search-summary").text)
    want = _search(inspector, {"query": question}).json()
    assert f"top 3 memories · {want['tokens']} tokens in the prompt" in by_id("search-summary").text
    hits = by_id("search-results").find_elements(By.CSS_SELECTOR, "li.hit")
    assert [h.text.splitlines()[0] for h in hits] == [it["text"] for it in want["items"]]
    assert "counseling" in hits[0].text

    d.set_window_size(1366, min(3200, d.execute_script("return document.documentElement.scrollHeight") + 40))
    shot = Path(os.environ.get("TSUBASA_INSPECTOR_SCREENSHOT") or tmp_path / "inspector.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    by_id("forget-open").send_keys(Keys.ENTER)
    wait.until(lambda _: by_id("forget-dialog").get_attribute("open") is not None)
    by_id("forget-confirm").send_keys("conv-2")
    assert not by_id("forget-go").is_enabled()  # nothing happens until the user id is typed in full
    by_id("forget-confirm").send_keys("6")
    by_id("forget-go").click()
    wait.until(lambda _: "Forgot conv-26" in by_id("forget-result").text)
    assert by_id("memories-h").text == "Memories (0)"
    assert not [e for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    # the forget went through DELETE /v1/users/{id}: acme's conv-26 is gone, globex's is not
    assert _get(inspector, f"/v1/users/{USER}/memories").json()["total"] == 0
    assert _get(inspector, f"/v1/users/{USER}/adapters").json()["items"] == []
    assert _get(inspector, f"/v1/users/{USER}/memories", tenant="globex").json()["total"] == 3
