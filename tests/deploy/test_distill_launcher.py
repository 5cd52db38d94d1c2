"""The distillation launcher the chart's CronJob runs (charts/tsubasa/files/launch_rayjobs.py): its
plan, and a whole run against a fake Kubernetes API on loopback fed with the chart's own run.yaml."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deploy_checks import CHART, VALUE_SETS, distill_rayjobs, find, render

JOB = " --job-config /etc/tsubasa/distill-job.yaml"
SCRIPT = CHART / "files" / "launch_rayjobs.py"
_spec = importlib.util.spec_from_file_location("launch_rayjobs", SCRIPT)
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)


def rayjob(name: str, key: str, status: str | None, created: str) -> dict:
    job = {"metadata": {"name": name, "labels": {launcher.JOB_KEY: key}, "creationTimestamp": created}}
    if status is not None:
        job["status"] = {"jobDeploymentStatus": status}
    return job


def test_plan_skips_a_tenant_whose_previous_run_is_active():
    templates = [rayjob("", "a", None, ""), rayjob("", "b", None, "")]
    existing = [rayjob("a-1", "a", "Running", "2026-01-02T00:00:00Z"),
                rayjob("b-1", "b", "Complete", "2026-01-01T00:00:00Z")]
    create, delete = launcher.plan(templates, existing, forbid_concurrent=True, history_limit=5)
    assert [job_key(j) for j in create] == ["b"]
    assert delete == []
    create, _ = launcher.plan(templates, existing, forbid_concurrent=False, history_limit=5)
    assert [job_key(j) for j in create] == ["a", "b"]


def test_plan_counts_a_just_created_rayjob_as_active():
    """A RayJob KubeRay has not picked up yet has no status: it is active, not finished."""
    create, _ = launcher.plan([rayjob("", "a", None, "")], [rayjob("a-1", "a", None, "2026-01-01")], True, 5)
    assert create == []


def test_plan_prunes_finished_runs_beyond_the_history_limit_per_job():
    existing = [rayjob(f"a-{i}", "a", "Failed" if i % 2 else "Complete", f"2026-01-0{i}") for i in range(1, 6)]
    existing += [rayjob("b-1", "b", "Complete", "2026-01-01"), rayjob("a-9", "a", "Running", "2026-01-09")]
    _, delete = launcher.plan([], existing, True, history_limit=2)
    assert delete == ["a-3", "a-2", "a-1"]  # newest two finished kept; running a-9 and b untouched


def test_every_api_key_tenant_gets_a_run():
    runs = [{"key": "per-api-key-tenant", "tenant": "*", "entrypoint": "tsubasa distill --tenant {tenant} --all-new"}]
    keys = "acme:" + "a" * 64 + ",\nglobex:" + "b" * 64 + ",acme:" + "c" * 64
    out = launcher.expand(runs, keys)
    assert [(r["tenant"], r["entrypoint"]) for r in out] == [
        ("acme", "tsubasa distill --tenant acme --all-new"), ("globex", "tsubasa distill --tenant globex --all-new")]
    assert out[0]["key"] == hashlib.sha256(b"acme").hexdigest()[:16]
    assert launcher.expand(runs, "") == []
    with pytest.raises(ValueError, match="entry 1"):
        launcher.expand(runs, "acme corp:" + "a" * 64)


def test_job_keys_match_the_charts():
    """The chart labels listed tenants with sha256(tenant)[:16], as the launcher does for expanded ones."""
    docs = render({**VALUE_SETS["small"], "distill": {**VALUE_SETS["small"]["distill"], "tenants": ["acme"]}})
    (job,) = distill_rayjobs(docs)
    assert job["metadata"]["labels"][launcher.JOB_KEY] == hashlib.sha256(b"acme").hexdigest()[:16]


def job_key(job: dict) -> str:
    return job["metadata"]["labels"][launcher.JOB_KEY]


class FakeKubeAPI(BaseHTTPRequestHandler):
    """Just enough of the RayJob REST API: list (label selector), create (generateName), delete."""

    store: dict[str, dict] = {}
    requests: list[tuple[str, str]] = []
    counter = 0

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).requests.append(("GET", self.path))
        assert self.headers["Authorization"] == "Bearer test-token"
        self._reply(200, {"kind": "RayJobList", "items": list(type(self).store.values())})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).counter += 1
        name = body["metadata"]["generateName"] + f"x{type(self).counter:04d}"
        body["metadata"]["name"] = name
        type(self).store[name] = body
        type(self).requests.append(("POST", self.path))
        self._reply(201, body)

    def do_DELETE(self):
        name = self.path.rsplit("/", 1)[1]
        type(self).requests.append(("DELETE", self.path))
        type(self).store.pop(name)
        self._reply(200, {"status": "Success"})


@pytest.fixture()
def fake_api(tmp_path):
    FakeKubeAPI.store, FakeKubeAPI.requests, FakeKubeAPI.counter = {}, [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def run_launcher(url: str, tmp_path, values: dict) -> subprocess.CompletedProcess:
    docs = render(values)
    (cm,) = [c for c in find(docs, "ConfigMap") if "run.yaml" in c["data"]]
    (cron,) = find(docs, "CronJob")
    # The script the CronJob runs is the chart file, carried in the ConfigMap.
    assert cm["data"]["launch_rayjobs.py"].strip() == SCRIPT.read_text().strip()
    env_spec = {e["name"]: e.get("value") for e in
                cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    (tmp_path / "run.yaml").write_text(cm["data"]["run.yaml"])
    (tmp_path / "token").write_text("test-token\n")
    env = {**os.environ, "NAMESPACE": "tsubasa", "RUN_FILE": str(tmp_path / "run.yaml"),
           "SELECTOR": env_spec["SELECTOR"], "FORBID_CONCURRENT": env_spec["FORBID_CONCURRENT"],
           "HISTORY_LIMIT": env_spec["HISTORY_LIMIT"], "K8S_API_URL": url,
           "K8S_TOKEN_FILE": str(tmp_path / "token")}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_a_scheduled_run_against_a_fake_api(fake_api, tmp_path):
    values = {**VALUE_SETS["small"], "distill": {**VALUE_SETS["small"]["distill"], "tenants": ["acme", "globex"]}}
    first = run_launcher(fake_api, tmp_path, values)
    assert first.returncode == 0, first.stderr
    created = list(FakeKubeAPI.store.values())
    assert sorted(j["metadata"]["annotations"]["tsubasa.ai/tenant"] for j in created) == ["acme", "globex"]
    assert sorted(j["spec"]["entrypoint"] for j in created) == [
        f"tsubasa distill --tenant acme --all-new{JOB}", f"tsubasa distill --tenant globex --all-new{JOB}"]
    assert FakeKubeAPI.requests[0][0] == "GET"
    assert "labelSelector=app.kubernetes.io%2Finstance%3Ddemo" in FakeKubeAPI.requests[0][1]
    assert all(p.startswith("/apis/ray.io/v1/namespaces/tsubasa/rayjobs") for _, p in FakeKubeAPI.requests)

    # Next tick while acme's run is still going: only globex (finished) gets a new RayJob.
    for job in created:
        tenant = job["metadata"]["annotations"]["tsubasa.ai/tenant"]
        job["status"] = {"jobDeploymentStatus": "Running" if tenant == "acme" else "Complete"}
        job["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    second = run_launcher(fake_api, tmp_path, values)
    assert second.returncode == 0, second.stderr
    assert "skipped 1 RayJob(s)" in second.stdout
    assert len(FakeKubeAPI.store) == 3


def test_launcher_reports_api_errors(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"template": {}, "runs": []}))
    (tmp_path / "token").write_text("t")
    env = {**os.environ, "NAMESPACE": "x", "RUN_FILE": str(tmp_path / "run.json"), "SELECTOR": "a=b",
           "K8S_API_URL": "http://127.0.0.1:9", "K8S_TOKEN_FILE": str(tmp_path / "token")}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error:")
    env["RUN_FILE"] = str(tmp_path / "missing.json")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read the launcher inputs" in proc.stderr


def test_the_kustomize_copy_of_the_launcher_is_the_charts():
    """kustomize reads files only under its own root, so k8s/base carries a copy of the chart's
    launcher for its ConfigMap; the two must never drift."""
    copy = CHART.parent.parent / "k8s" / "base" / "launch_rayjobs.py"
    assert copy.read_bytes() == SCRIPT.read_bytes(), "run: cp charts/tsubasa/files/launch_rayjobs.py k8s/base/"
