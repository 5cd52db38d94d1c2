"""Create one scheduled distillation run: a RayJob per tenant, built from the template and the runs
in RUN_FILE, through the Kubernetes API with the pod's ServiceAccount. Run by the chart's CronJob.

Standard library plus PyYAML (a tsubasa dependency), so it runs in the application image without
kubectl. A RayJob whose previous run is still active is skipped (FORBID_CONCURRENT), and finished
RayJobs beyond HISTORY_LIMIT per scheduled job are deleted (KubeRay already deleted their clusters).

A run with tenant "*" stands for every tenant holding an API key: it is expanded from
TSUBASA_API_KEYS (`tenant:sha256hex,...`, mounted from the API keys Secret), its entrypoint's
`{tenant}` filled in.

Environment: NAMESPACE, RUN_FILE (YAML or JSON: {template: RayJob, runs: [{key, tenant, entrypoint}]}),
SELECTOR (label selector of this release's RayJobs), FORBID_CONCURRENT (true/false), HISTORY_LIMIT,
and for tests K8S_API_URL / K8S_TOKEN_FILE / K8S_CA_FILE.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

JOB_KEY = "tsubasa.ai/distill-job"
FINISHED = {"Complete", "Failed"}
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")  # tsubasa.schema.IDENTIFIER_RE


def is_active(rayjob: dict[str, Any]) -> bool:
    """A RayJob is active until KubeRay marks its deployment Complete or Failed."""
    return (rayjob.get("status") or {}).get("jobDeploymentStatus", "") not in FINISHED


def job_key(obj: dict[str, Any]) -> str:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(JOB_KEY, "")


def tenants_from_api_keys(spec: str) -> list[str]:
    """The tenants named in TSUBASA_API_KEYS (`tenant:sha256hex,...`); ValueError on a bad entry."""
    tenants = set()
    for i, raw in enumerate(p.strip() for p in spec.replace("\n", ",").split(",")):
        if not raw:
            continue
        tenant, sep, _ = raw.partition(":")
        tenant = tenant.strip()
        if not sep or not TENANT_RE.fullmatch(tenant) or ".." in tenant:
            raise ValueError(f"TSUBASA_API_KEYS entry {i + 1} is not <tenant>:<sha256 hex>")
        tenants.add(tenant)
    return sorted(tenants)


def expand(runs: list[dict[str, str]], api_keys: str) -> list[dict[str, str]]:
    """Runs with tenant "*" become one run per API-key tenant (job key = sha256(tenant)[:16])."""
    out = []
    for run in runs:
        if run["tenant"] != "*":
            out.append(run)
            continue
        for tenant in tenants_from_api_keys(api_keys):
            out.append({"key": hashlib.sha256(tenant.encode()).hexdigest()[:16], "tenant": tenant,
                        "entrypoint": run["entrypoint"].replace("{tenant}", tenant)})
    return out


def build(template: dict[str, Any], run: dict[str, str]) -> dict[str, Any]:
    """The RayJob of one run: the template with this run's entrypoint, job key and tenant."""
    rayjob = copy.deepcopy(template)
    meta = rayjob.setdefault("metadata", {})
    meta.setdefault("labels", {})[JOB_KEY] = run["key"]
    meta.setdefault("annotations", {})["tsubasa.ai/tenant"] = run["tenant"]
    rayjob["spec"]["entrypoint"] = run["entrypoint"]
    return rayjob


def plan(rayjobs: list[dict[str, Any]], existing: list[dict[str, Any]], forbid_concurrent: bool,
         history_limit: int) -> tuple[list[dict[str, Any]], list[str]]:
    """(RayJobs to create, names of finished RayJobs to delete) for this run."""
    create = []
    for rayjob in rayjobs:
        key = job_key(rayjob)
        if not key:
            raise ValueError(f"RayJob without label {JOB_KEY}: {rayjob.get('metadata')}")
        if forbid_concurrent and any(job_key(j) == key and is_active(j) for j in existing):
            continue
        create.append(rayjob)
    delete = []
    for key in sorted({job_key(j) for j in existing}):
        finished = [j for j in existing if job_key(j) == key and not is_active(j)]
        finished.sort(key=lambda j: j["metadata"].get("creationTimestamp", ""), reverse=True)
        delete.extend(j["metadata"]["name"] for j in finished[max(history_limit, 0):])
    return create, delete


class KubeAPI:
    """The few RayJob calls the launcher needs, over the in-cluster API endpoint."""

    def __init__(self, url: str, token: str, ca_file: str | None, namespace: str) -> None:
        self.base = f"{url.rstrip('/')}/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def list(self, selector: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"labelSelector": selector})
        return self._call("GET", f"{self.base}?{query}").get("items", [])

    def create(self, rayjob: dict[str, Any]) -> str:
        return self._call("POST", self.base, rayjob)["metadata"]["name"]

    def delete(self, name: str) -> None:
        self._call("DELETE", f"{self.base}/{urllib.parse.quote(name)}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def main() -> int:
    env = os.environ
    try:
        with open(env.get("RUN_FILE", "/etc/tsubasa-distill/run.yaml")) as f:
            run_spec = yaml.safe_load(f)
        runs = expand(run_spec["runs"], env.get("TSUBASA_API_KEYS", ""))
        rayjobs = [build(run_spec["template"], run) for run in runs]
        namespace = env.get("NAMESPACE") or _read(f"{SA_DIR}/namespace")
        token = _read(env.get("K8S_TOKEN_FILE", f"{SA_DIR}/token"))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        print(f"error: cannot read the launcher inputs: {exc}", file=sys.stderr)
        return 2
    api = KubeAPI(env.get("K8S_API_URL", "https://kubernetes.default.svc"), token,
                  env.get("K8S_CA_FILE", f"{SA_DIR}/ca.crt"), namespace)
    try:
        existing = api.list(env["SELECTOR"])
        create, delete = plan(rayjobs, existing, env.get("FORBID_CONCURRENT", "true") == "true",
                              int(env.get("HISTORY_LIMIT", "5")))
        for name in delete:
            api.delete(name)
            print(f"deleted finished RayJob {name}")
        for rayjob in create:
            tenant = rayjob["metadata"]["annotations"]["tsubasa.ai/tenant"]
            print(f"created RayJob {api.create(rayjob)} (tenant {tenant})")
        skipped = len(rayjobs) - len(create)
        if skipped:
            print(f"skipped {skipped} RayJob(s): the previous run is still active")
    except urllib.error.HTTPError as exc:
        print(f"error: Kubernetes API answered {exc.code}: {exc.read()[:500].decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
