"""yamllint over the deployment YAML (Helm templates are Go templates, not YAML, and are skipped), and
every chart value documented in values.yaml."""

from __future__ import annotations

import re

from deploy_checks import CHART, K8S, REPO

CONFIG = REPO / "tests" / "deploy" / "yamllint.yaml"


def test_yamllint_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(CONFIG))
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml")),
             *sorted(K8S.rglob("*.yaml")), REPO / "ray_cluster.yaml",
             *sorted((REPO / "tests" / "deploy" / "schemas").glob("*.yaml")), CONFIG]
    problems = []
    for path in files:
        for p in linter.run(path.read_text(), conf, str(path)):
            problems.append(f"{path.relative_to(REPO)}:{p.line}:{p.column}: {p.level}: {p.message}")
    assert not problems, "\n".join(problems)
    assert len(files) > 20


# Children of these keys are free-form data (Kubernetes objects, application settings, ...).
FREE = {"config", "milvus", "job", "resources", "rayStartParams", "podSecurityContext", "securityContext",
        "authOptions", "tolerations", "nodeSelector", "requests", "limits", "labels", "annotations", "affinity"}


def undocumented(text: str) -> list[str]:
    """Keys of values.yaml without a comment line right above them (outside free-form data)."""
    lines, stack, out = text.splitlines(), [], []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z0-9_./-]+):", line)
        if not m or line.strip().startswith("#"):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        free = any(key in FREE or item for _, key, item in stack)
        if not free and not m.group(2) and not (i and lines[i - 1].strip().startswith("#")):
            out.append(f"values.yaml:{i + 1}: {line.strip()}")
        stack.append((indent, m.group(3), bool(m.group(2))))
    return out


def test_every_value_is_documented():
    assert undocumented((CHART / "values.yaml").read_text()) == []
    assert undocumented("a:\n  b: 1\n") == ["values.yaml:1: a:", "values.yaml:2: b: 1"]
