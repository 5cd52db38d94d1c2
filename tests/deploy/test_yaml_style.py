"""yamllint over the deployment YAML (Helm templates are Go templates, not YAML, and are skipped)."""

from __future__ import annotations

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
