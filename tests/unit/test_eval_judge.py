"""The judge: reply parser on CORRECT/WRONG in several shapes, local-engine and OpenAI-endpoint judges."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from scripted import ScriptedEngine

from tsubasa.eval.judge import EngineJudge, JudgeItem, OpenAIJudge, make_judge, parse_judge_reply


@pytest.mark.parametrize(("reply", "label"), [
    ('{"label": "CORRECT"}', "CORRECT"),
    ('{"label": "WRONG"}', "WRONG"),
    ('```json\n{"label": "WRONG"}\n```', "WRONG"),
    ('Both name the same necklace. {"label":"correct"}', "CORRECT"),
    ('{"reasoning": "same month, other format", "label": "CORRECT"}', "CORRECT"),
    ('It looks correct at first, but it is another city. {"label": "WRONG"}', "WRONG"),
    ("{'label': 'CORRECT'}", "CORRECT"),  # python-style quotes: not JSON, still a label pair
    ("label: WRONG", "WRONG"),
    ("The generated answer is on the same topic as the gold answer. CORRECT", "CORRECT"),
    ("INCORRECT", "WRONG"),
    ("The answer is not correct.", "WRONG"),
    ("This answer isn't correct", "WRONG"),
    ("this is correct", "CORRECT"),
    ("The answer is wrong because the year differs", "WRONG"),
    ("Reasoning: the gold answer is a date, the generated one is a place.\nWRONG", "WRONG"),
])
def test_parse_judge_reply_shapes(reply, label):
    assert parse_judge_reply(reply) == label


@pytest.mark.parametrize("reply", [None, "", "   ", '{"label": "MAYBE"}', '{"label": ', "I cannot decide.",
                                   "The gold answer is a shell necklace."])
def test_parse_judge_reply_malformed_is_none(reply):
    assert parse_judge_reply(reply) is None


def test_engine_judge_records_its_name_and_fills_the_prompt():
    replies = ['{"label": "CORRECT"}', "WRONG", "no idea"]
    engine = ScriptedEngine(replies, model_name="scripted-judge")
    judge = EngineJudge(engine)
    items = [JudgeItem(question=f"Where did Caroline move from? ({i})", gold="Sweden", prediction="Sweden")
             for i in range(3)]
    verdicts = judge.judge(items)
    assert [v.label for v in verdicts] == ["CORRECT", "WRONG", None]
    assert all(v.judge == "local:scripted-judge" for v in verdicts)
    assert [v.correct for v in verdicts] == [True, False, False]
    prompt = engine.prompts[0][-1].content
    assert "Where did Caroline move from? (0)" in prompt and "Gold answer: Sweden" in prompt
    assert "Generated answer: Sweden" in prompt and '{"label": "CORRECT"}' in prompt


class _ChatStub(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose *model* is a fixed reply (the client and judge are real)."""

    replies: list[str] = []
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        reply = type(self).replies.pop(0)
        out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": reply}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_openai_judge_against_a_local_endpoint():
    _ChatStub.replies = ['{"label": "CORRECT"}', "Different city. WRONG"]
    _ChatStub.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = OpenAIJudge(model="judge-model", base_url=url, api_key="k", max_retries=0)
        verdicts = judge.judge([JudgeItem(question="q1", gold="Sweden", prediction="Sweden"),
                                JudgeItem(question="q2", gold="Sweden", prediction="Boston")])
    finally:
        server.shutdown()
    assert [v.label for v in verdicts] == ["CORRECT", "WRONG"]
    assert verdicts[0].judge == f"openai:judge-model@{url}"
    assert _ChatStub.seen[0]["model"] == "judge-model" and _ChatStub.seen[0]["temperature"] == 0.0
    assert "q1" in _ChatStub.seen[0]["messages"][0]["content"]


def test_openai_judge_unreachable_records_the_error_instead_of_raising():
    judge = OpenAIJudge(model="m", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=2)
    (v,) = judge.judge([JudgeItem(question="q", gold="a", prediction="a")])
    assert v.label is None and v.error and "Connection" in v.error


def test_make_judge_choices():
    engine = ScriptedEngine([], model_name="m")
    assert make_judge("none", engine) is None
    assert make_judge("auto", engine).name == "local:m"
    assert make_judge("auto", engine, base_url="http://x/v1", model="gpt").name == "openai:gpt@http://x/v1"
    with pytest.raises(ValueError, match="judge model"):
        make_judge("openai", engine)
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("gpt", engine)
