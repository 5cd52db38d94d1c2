"""The store refuses a Milvus server whose upsert misroutes partition-keyed rows (milvus-io/milvus#30607)."""

import pytest

from tsubasa.memory.milvus import MilvusVersionError, check_server_version


@pytest.mark.parametrize("version", ["v2.3.5-lite", "v2.3.5", "2.2.16"])
def test_old_servers_are_refused_with_the_reason(version):
    with pytest.raises(MilvusVersionError, match=r"needs 2\.4\.0 or newer.*#30607") as exc:
        check_server_version(version, "http://milvus:19530")
    assert version in str(exc.value) and "http://milvus:19530" in str(exc.value)


@pytest.mark.parametrize("version", ["v2.4.0", "v2.5.16", "2.6.3-gpu", "milvus_lite-3.2.2"])
def test_current_servers_and_milvus_lite_pass(version):
    check_server_version(version, "http://milvus:19530")


def test_an_unparseable_version_is_logged_not_refused(caplog):
    check_server_version("master-20261201", "http://milvus:19530")
    assert "cannot check" in caplog.text
