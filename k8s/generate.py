"""Write the plain Kubernetes manifests in k8s/ from the Helm chart, so both stay one deployment.

    python k8s/generate.py           # rewrite k8s/base and k8s/overlays/* from charts/tsubasa
    python k8s/generate.py --check   # exit 1 when k8s/ differs from what the chart renders

Layout (kustomize): `base/` is the GPU production shape (chart defaults with the values below);
`overlays/gpu-prod` puts it in namespace `tsubasa` and scales the GPU workers; `overlays/dev-cpu`
patches it down to a CPU development cluster (small model, milvus-lite, adapters on a PVC, one
Kafka replica). Overlay patches are RFC 6902 JSON patches computed against the base. Needs the
`dev` extra (helm-python-sdk, jsonpatch); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
CHART = ROOT.parent / "charts" / "tsubasa"
RELEASE = "tsubasa"
HEADER = "# Generated from charts/tsubasa by k8s/generate.py; edit the chart or the values there, then regenerate.\n"
CONFIGMAP_FILES = {"tsubasa-config": ["config.yaml", "distill-job.yaml"],
                   "tsubasa-distill": ["run.yaml", "launch_rayjobs.py"]}

# What every environment shares: the chart defaults plus explicit Kafka wiring.
BASE_VALUES: dict[str, Any] = {
    "kafka": {"bootstrapServers": "kafka-kafka-bootstrap.kafka.svc:9092", "strimzi": {"clusterName": "kafka"}},
}
OVERLAYS: dict[str, dict[str, Any]] = {
    "gpu-prod": {
        "namespace": "tsubasa",
        "values": {"rayService": {"gpuWorkers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 8}},
                   "config": {"serve": {"llm_replicas": 2, "min_replicas": 2, "max_replicas": 8}}},
    },
    "dev-cpu": {
        "namespace": "tsubasa-dev",
        "values": yaml.safe_load((CHART / "ci" / "small-values.yaml").read_text()),
    },
}


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing for these values: maps merge, anything else (null included) replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _strip_helm(obj: Any) -> Any:
    """Drop what only Helm uses: chart/manager labels, resource policies, config checksums."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key in ("labels", "annotations") and isinstance(value, dict):
                value = {k: v for k, v in value.items()
                         if not k.startswith(("helm.sh/", "checksum/")) and k != "app.kubernetes.io/managed-by"}
                if not value:
                    continue
            out[key] = _strip_helm(value)
        return out
    if isinstance(obj, list):
        return [_strip_helm(v) for v in obj]
    return obj


def render(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Chart template name -> its objects, rendered for release `tsubasa` in namespace `default`
    (kustomize's namespace transformer then moves them, RoleBinding subjects included)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values=values, name=RELEASE, namespace="default")
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs = [_strip_helm(d) for d in yaml.safe_load_all(text) if d]
            if docs:
                out[Path(path).stem] = docs
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, scripts) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _dump_docs(docs: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(_yaml(d) for d in docs)


def _split_configmaps(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Generated ConfigMaps become files (kustomize configMapGenerator): readable and editable."""
    rest, files = [], {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] in CONFIGMAP_FILES:
            assert sorted(d["data"]) == sorted(CONFIGMAP_FILES[d["metadata"]["name"]]), d["data"].keys()
            data = dict(d["data"])
            if "run.yaml" in data:  # the RayJob template inside is Helm output too
                data["run.yaml"] = _yaml(_strip_helm(yaml.safe_load(data["run.yaml"])))
            files[d["metadata"]["name"]] = data
        else:
            rest.append(d)
    return rest, files


def _generator(files: dict[str, dict[str, str]], behavior: str | None) -> list[dict[str, Any]]:
    gens = []
    for name, data in sorted(files.items()):
        gen: dict[str, Any] = {"name": name}
        if behavior:
            gen["behavior"] = behavior
        gen["files"] = sorted(data)
        gens.append(gen)
    return gens


def build() -> dict[Path, str]:
    """Every file of k8s/ (path -> content) as the chart renders it now."""
    import jsonpatch

    out: dict[Path, str] = {}
    base_by_template = render(BASE_VALUES)
    base_docs = [d for docs in base_by_template.values() for d in docs]
    base_objs, base_files = _split_configmaps(base_docs)
    base_index = {_key(d): d for d in base_objs}
    resources = []
    for template, docs in base_by_template.items():
        kept = [d for d in docs if _key(d) in base_index]
        if kept:
            out[ROOT / "base" / f"{template}.yaml"] = _dump_docs(kept)
            resources.append(f"{template}.yaml")
    for data in base_files.values():
        for fname, content in data.items():
            out[ROOT / "base" / fname] = content
    out[ROOT / "base" / "kustomization.yaml"] = HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "configMapGenerator": _generator(base_files, None),
        # The names are referenced from inside RayService/RayJob pod templates, which kustomize's
        # name-reference rewriting does not know: keep them stable.
        "generatorOptions": {"disableNameSuffixHash": True},
    }, sort_keys=False)

    for overlay, spec in OVERLAYS.items():
        odir = ROOT / "overlays" / overlay
        docs = [d for ds in render(deep_merge(BASE_VALUES, spec["values"])).values() for d in ds]
        objs, files = _split_configmaps(docs)
        extra, patches = [], []
        for obj in objs:
            base_obj = base_index.get(_key(obj))
            if base_obj is None:
                extra.append(obj)
                continue
            ops = jsonpatch.make_patch(base_obj, obj).patch
            if ops:
                fname = f"patches/{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
                out[odir / fname] = HEADER + _yaml(ops)
                patches.append({"path": fname, "target": {"kind": obj["kind"], "name": obj["metadata"]["name"]}})
        missing = set(base_index) - {_key(o) for o in objs}
        assert not missing, f"overlay {overlay} would need to delete {missing}: not supported"
        # Only the files that differ from the base: merged into the base's ConfigMaps.
        changed = {name: {f: c for f, c in data.items() if c != base_files[name].get(f)}
                   for name, data in files.items()}
        changed = {name: data for name, data in changed.items() if data}
        for data in changed.values():
            for fname, content in data.items():
                out[odir / fname] = content
        kust: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": spec["namespace"],
            "resources": ["../../base"] + (["resources.yaml"] if extra else []),
            "labels": [{"pairs": {"app.kubernetes.io/environment": overlay}}],
        }
        if changed:
            kust["configMapGenerator"] = _generator(changed, "merge")
        if patches:
            kust["patches"] = patches
        if extra:
            out[odir / "resources.yaml"] = _dump_docs(extra)
        out[odir / "kustomization.yaml"] = HEADER + yaml.safe_dump(kust, sort_keys=False)
    return out


def existing() -> dict[Path, str]:
    return {p: p.read_text() for sub in ("base", "overlays") for p in (ROOT / sub).rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether k8s/ is up to date")
    args = parser.parse_args(argv)
    want, have = build(), existing()
    stale = sorted(str(p.relative_to(ROOT)) for p in set(want) | set(have) if want.get(p) != have.get(p))
    if args.check:
        if stale:
            print("k8s/ differs from the chart (run `python k8s/generate.py`): " + ", ".join(stale))
            return 1
        print("k8s/ is up to date with charts/tsubasa")
        return 0
    for path in set(have) - set(want):
        path.unlink()
    for path, content in want.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print(f"wrote {len(want)} files under k8s/ ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
