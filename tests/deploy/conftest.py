"""Deployment tests: the Helm chart, the k8s/ overlays and ray_cluster.yaml, checked offline.

Helpers live in `deploy_checks.py` (imported by the test modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.deploy)


def pytest_configure(config):
    config.addinivalue_line("markers", "deploy: Helm chart, k8s manifests and ray_cluster.yaml checks (offline)")
