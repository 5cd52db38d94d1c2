"""Deployment checks, all offline: render the Helm chart with helm-python-sdk (Helm 4 as a library),
build the kustomize overlays, and validate what comes out.

Core kinds are validated with kubernetes-validate (the Kubernetes OpenAPI schemas shipped in the
package, strict: unknown fields fail). Custom resources are validated against the schemas in
`schemas/` (KubeRay, Strimzi, Prometheus Operator), and every pod template inside a custom resource
against Kubernetes' own PodTemplateSpec schema.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tsubasa"
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
KUBE_VERSIONS = ("1.30", "1.33")  # the oldest supported and a current one
RELEASE = "demo"
NAMESPACE = "tsubasa"


# ------------------------------------------------------------------ rendering


@functools.cache
def _render_cached(values_json: str, release: str, namespace: str) -> tuple[tuple[str, str], ...]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=json.loads(values_json), name=release, namespace=namespace)
    return tuple(sorted(out.items()))


def render_files(values: dict[str, Any] | None = None, release: str = RELEASE,
                 namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True), release, namespace))


def render(values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects, in template order (deep copies: tests may mutate them)."""
    docs = []
    for path, text in render_files(values, **kw).items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return copy.deepcopy(docs)


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text()) or {}


VALUE_SETS = {
    "default": {},
    "small": values_file("ci/small-values.yaml"),
    "large": values_file("ci/large-values.yaml"),
}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# ------------------------------------------------------------------ validation


@functools.cache
def _cr_schemas() -> dict[str, dict[str, Any]]:
    """kind -> JSON Schema (with the file's $defs) for the custom resources the project uses."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*.schema.yaml")):
        doc = yaml.safe_load(path.read_text())
        defs = doc.get("$defs", {})
        for kind, schema in doc.items():
            if kind.startswith("$"):
                continue
            schemas[kind] = {"$schema": doc["$schema"], "$defs": defs, **schema}
    return schemas


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template inside a RayService/RayJob/RayCronJob."""
    spec = obj.get("spec", {})
    found = []

    def cluster(prefix: str, rc: dict[str, Any] | None) -> None:
        if not rc:
            return
        found.append((f"{prefix}.headGroupSpec.template", rc["headGroupSpec"]["template"]))
        for i, group in enumerate(rc.get("workerGroupSpecs", [])):
            found.append((f"{prefix}.workerGroupSpecs[{i}].template", group["template"]))

    if obj["kind"] == "RayService":
        cluster("spec.rayClusterConfig", spec.get("rayClusterConfig"))
    elif obj["kind"] == "RayJob":
        cluster("spec.rayClusterSpec", spec.get("rayClusterSpec"))
    elif obj["kind"] == "RayCronJob":
        cluster("spec.jobTemplate.rayClusterSpec", spec.get("jobTemplate", {}).get("rayClusterSpec"))
    return found


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema problem of one object (empty when valid); unknown kinds are an error."""
    import kubernetes_validate as kv
    from kubernetes_validate.utils import SchemaNotFoundError

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name') or obj.get('metadata', {}).get('generateName')}"
    schema = _cr_schemas().get(obj.get("kind", ""))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        for where, tpl in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": tpl}
            errors += [f"{name}: {where}: {e}" for e in validation_errors(wrapped)]
        return errors
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{name} (k8s {version}): {'.'.join(map(str, e.path))}: {e.message}")
        except SchemaNotFoundError:
            errors.append(f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')}")
    return errors


def assert_valid(docs: list[dict[str, Any]]) -> None:
    problems = [p for d in docs for p in validation_errors(d)]
    assert not problems, "schema violations:\n  " + "\n  ".join(problems)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The env a rendered container would see, Secret references filled with stand-in values."""
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        value = f"from-secret-{ref['name']}" if ref else e.get("value")
        if value is not None:
            out[e["name"]] = value
    return out


def all_pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodSpec) of every pod the objects would create, custom resources included."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata'].get('name', '')}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((name, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        for where, tpl in pod_templates(d):
            out.append((f"{name} {where}", tpl["spec"]))
    return out


# What the API keys Secret holds in these checks: two tenants (the hashes are of "key-a"/"key-b").
SAMPLE_API_KEYS = ("acme:" + hashlib.sha256(b"key-a").hexdigest() + ",globex:" + hashlib.sha256(b"key-b").hexdigest())


@functools.cache
def launcher() -> Any:
    """charts/tsubasa/files/launch_rayjobs.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_rayjobs", CHART / "files" / "launch_rayjobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distill_rayjobs(docs: list[dict[str, Any]], api_keys: str = SAMPLE_API_KEYS) -> list[dict[str, Any]]:
    """The RayJobs one scheduled distillation run would create (from the launcher's ConfigMap, with
    `api_keys` standing in for the API keys Secret), or the RayCronJobs' job templates."""
    rayjobs = []
    for cm in find(docs, "ConfigMap"):
        if "run.yaml" in cm.get("data", {}):
            run = yaml.safe_load(cm["data"]["run.yaml"])
            rayjobs += [launcher().build(run["template"], r) for r in launcher().expand(run["runs"], api_keys)]
    return rayjobs


# ------------------------------------------------------------------ kustomize


def kustomize(path: Path) -> list[dict[str, Any]]:
    """Build a kustomization with the subset of kustomize the k8s/ layout uses: resources (files and
    directories), namespace (RoleBinding subjects in `default` or unset follow, as in kustomize),
    labels (metadata only), configMapGenerator (files; create / replace / merge) with
    disableNameSuffixHash, and RFC 6902 patches with a kind/name target. Anything else fails, so
    the layout cannot outgrow what this checks; `kubectl kustomize` cross-checks it where installed."""
    import jsonpatch

    spec = yaml.safe_load((path / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator", "generatorOptions",
             "patches"}
    assert set(spec) <= known, f"{path}: kustomize fields this check does not implement: {set(spec) - known}"
    assert spec.get("generatorOptions", {}) in ({}, {"disableNameSuffixHash": True})
    objs: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        target = path / res
        if target.is_dir():
            objs += kustomize(target)
        else:
            objs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "behavior", "files"}, gen
        data = {Path(f).name: (path / f).read_text() for f in gen.get("files", [])}
        behavior = gen.get("behavior", "create")
        existing = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            assert not existing, f"{path}: ConfigMap {gen['name']} already exists"
            objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
        else:
            (cm,) = existing
            cm["data"] = data if behavior == "replace" else {**cm.get("data", {}), **data}
    for patch in spec.get("patches", []):
        assert set(patch) == {"path", "target"} and set(patch["target"]) == {"kind", "name"}, patch
        ops = yaml.safe_load((path / patch["path"]).read_text())
        hits = [i for i, o in enumerate(objs)
                if o["kind"] == patch["target"]["kind"] and o["metadata"]["name"] == patch["target"]["name"]]
        assert len(hits) == 1, f"{path}: patch target {patch['target']} matched {len(hits)} objects"
        objs[hits[0]] = jsonpatch.apply_patch(objs[hits[0]], ops)
    if "namespace" in spec:
        for o in objs:
            o["metadata"]["namespace"] = spec["namespace"]
            for subject in o.get("subjects", []) if o["kind"] in ("RoleBinding", "ClusterRoleBinding") else []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (None, "default"):
                    subject["namespace"] = spec["namespace"]
    for label in spec.get("labels", []):
        assert set(label) <= {"pairs", "includeSelectors", "includeTemplates"} and not label.get("includeSelectors")
        assert not label.get("includeTemplates")
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
    return objs


def kubectl_kustomize(path: Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize` output when kubectl is installed (client only, offline), else None."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
