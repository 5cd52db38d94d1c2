"""Per-user LoRA adapter registry: immutable versions at `<root>/<tenant>/<user>/vNNNN/`, each with a
`manifest.json`, and a `current` pointer per user that is flipped atomically after a version is
complete, so a crash while publishing leaves the previous version serving.

The root is a local directory or an fsspec URL (`s3://bucket/adapters`, `gs://...`, `memory://...`).
A version counts only once its manifest is written (the manifest is written last); old versions
are pruned to the last `keep_versions`, never the current one. Serving loads `local_path(v)`, a
directory peft can read (remote versions are downloaded once into a local cache; versions never
change, so the cache never goes stale).

One writer per user at a time is assumed (the training job assigns each user to one worker); on
a local root a per-user file lock enforces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tsubasa.schema import validate_identifier

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_STAGING_PREFIX = ".tmp-"
_STALE_STAGING_S = 3600.0


class AdapterNotFoundError(KeyError):
    """No such adapter version for this user."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterManifest(BaseModel):
    """What an adapter version was trained from and how (written next to the weights)."""

    base_model: str
    rank: int = Field(ge=1)
    alpha: int = Field(ge=1)
    d: int = Field(ge=1)
    """Teacher top-d used for the targets (1 = cross-entropy on the teacher's argmax)."""
    loss: str
    """`topd_kl`, `ce_gold` or `lm` (vanilla fine-tuning on the raw conversation)."""
    data_hash: str
    """Hash of the training examples (QA pairs, grounding, teacher targets)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    n_examples: int = Field(0, ge=0)
    grounding_k: int = Field(3, ge=0)
    """Memories the student saw during training (0 = no grounding); serving should use the same."""
    variant: str = "tsubasa"
    """`tsubasa` (adapter + k memories), `no_grounding`, `vanilla` or an ablation tag."""
    target_modules: list[str] = Field(default_factory=list)
    memory_watermark: datetime | None = None
    """Newest memory update the training data saw (`distill --all-new` compares against it)."""
    extra: dict[str, Any] = Field(default_factory=dict)


class AdapterVersion(BaseModel):
    tenant_id: str
    user_id: str
    version: int = Field(ge=1)
    uri: str
    """Where the version lives (path or URL of its directory)."""
    manifest: AdapterManifest

    @property
    def name(self) -> str:
        """Stable adapter name for engines and serving: `<tenant>/<user>/v0007`."""
        return f"{self.tenant_id}/{self.user_id}/{version_dir(self.version)}"


def version_dir(version: int) -> str:
    return f"v{version:04d}"


def parse_adapter_name(name: str) -> tuple[str, str, int]:
    """`acme/alice/v0007` -> ("acme", "alice", 7); ValueError naming the problem otherwise."""
    parts = name.split("/")
    if len(parts) != 3 or not _VERSION_RE.match(parts[2]):
        raise ValueError(f"adapter name {name!r} is not <tenant>/<user>/vNNNN")
    return (validate_identifier(parts[0], "tenant_id"), validate_identifier(parts[1], "user_id"),
            int(parts[2][1:]))


class AdapterRegistry:
    """Versioned, immutable per-user adapters under a local or fsspec root."""

    def __init__(self, root: str, keep_versions: int = 5, cache_dir: str | None = None) -> None:
        import fsspec

        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (got {keep_versions})")
        self.root = str(root)
        self.keep_versions = keep_versions
        self.fs, base = fsspec.core.url_to_fs(self.root)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.base = base.rstrip("/") or "/"
        if self.local:
            Path(self.base).mkdir(parents=True, exist_ok=True)
        default_cache = Path(os.environ.get("TSUBASA_CACHE_DIR", Path.home() / ".cache" / "tsubasa")) / "adapters"
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache / _slug(self.root)

    # ---- paths --------------------------------------------------------------------------------
    def _user_dir(self, tenant_id: str, user_id: str) -> str:
        return f"{self.base}/{validate_identifier(tenant_id, 'tenant_id')}/{validate_identifier(user_id, 'user_id')}"

    def _uri(self, path: str) -> str:
        if self.local:
            return path
        return self.fs.unstrip_protocol(path)

    # ---- reading ------------------------------------------------------------------------------
    def _read_manifest(self, vdir: str) -> AdapterManifest | None:
        try:
            with self.fs.open(f"{vdir}/{MANIFEST}", "rb") as fh:
                return AdapterManifest.model_validate_json(fh.read())
        except FileNotFoundError:
            return None

    def _version_numbers(self, udir: str, complete_only: bool = True) -> list[int]:
        try:
            entries = self.fs.ls(udir, detail=False)
        except FileNotFoundError:
            return []
        nums = []
        for e in entries:
            m = _VERSION_RE.match(e.rstrip("/").rsplit("/", 1)[-1])
            if m and (not complete_only or self.fs.exists(f"{e.rstrip('/')}/{MANIFEST}")):
                nums.append(int(m.group(1)))
        return sorted(nums)

    def get(self, tenant_id: str, user_id: str, version: int) -> AdapterVersion:
        """One complete version; AdapterNotFoundError if it does not exist (or was pruned)."""
        udir = self._user_dir(tenant_id, user_id)
        vdir = f"{udir}/{version_dir(version)}"
        manifest = self._read_manifest(vdir)
        if manifest is None:
            raise AdapterNotFoundError(f"no adapter {tenant_id}/{user_id}/{version_dir(version)} in {self.root}")
        return AdapterVersion(tenant_id=tenant_id, user_id=user_id, version=version, uri=self._uri(vdir),
                              manifest=manifest)

    def get_by_name(self, name: str) -> AdapterVersion:
        tenant_id, user_id, version = parse_adapter_name(name)
        return self.get(tenant_id, user_id, version)

    def current_version(self, tenant_id: str, user_id: str) -> int | None:
        """The version the user's pointer names (None if the user has never published)."""
        try:
            with self.fs.open(f"{self._user_dir(tenant_id, user_id)}/{POINTER}", "rb") as fh:
                return int(json.loads(fh.read())["version"])
        except FileNotFoundError:
            return None

    def current(self, tenant_id: str, user_id: str) -> AdapterVersion | None:
        """The version serving should use for this user, or None."""
        v = self.current_version(tenant_id, user_id)
        if v is None:
            return None
        try:
            return self.get(tenant_id, user_id, v)
        except AdapterNotFoundError:
            log.warning("adapter pointer of %s/%s names missing version %s", tenant_id, user_id, v)
            return None

    def users(self, tenant_id: str) -> list[str]:
        tdir = f"{self.base}/{validate_identifier(tenant_id, 'tenant_id')}"
        try:
            entries = self.fs.ls(tdir, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e["type"] == "directory" and not e["name"].rsplit("/", 1)[-1].startswith("."))

    def tenants(self) -> list[str]:
        try:
            entries = self.fs.ls(self.base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e["type"] == "directory" and not e["name"].rsplit("/", 1)[-1].startswith("."))

    def list(self, tenant_id: str, user_id: str | None = None) -> list[AdapterVersion]:
        """Complete versions of one user (or every user of the tenant), oldest first per user."""
        users = [user_id] if user_id is not None else self.users(tenant_id)
        out = []
        for u in users:
            for n in self._version_numbers(self._user_dir(tenant_id, u)):
                with contextlib.suppress(AdapterNotFoundError):
                    out.append(self.get(tenant_id, u, n))
        return out

    def local_path(self, v: AdapterVersion) -> str:
        """A local directory with the version's files (downloaded once for a remote root)."""
        if self.local:
            return v.uri
        target = self.cache_dir / v.tenant_id / v.user_id / version_dir(v.version)
        if (target / MANIFEST).is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target.parent))
        try:
            src = f"{self._user_dir(v.tenant_id, v.user_id)}/{version_dir(v.version)}"
            for path in self.fs.find(src):
                rel = path[len(src):].lstrip("/")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(tmp / rel))
            try:
                tmp.rename(target)
            except OSError:  # another process finished the same download first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)

    # ---- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _user_lock(self, udir: str) -> Iterator[None]:
        if not self.local:
            yield
            return
        Path(udir).mkdir(parents=True, exist_ok=True)
        with open(f"{udir}/.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, tenant_id: str, user_id: str, src_dir: str | Path, manifest: AdapterManifest,
                before_flip: Callable[[AdapterVersion], None] | None = None) -> AdapterVersion:
        """Publish the adapter files in `src_dir` as the user's next version and make it current.

        Order: copy into a staging directory, move it to `vNNNN/` (manifest last, so a partial copy
        never counts as a version), then rewrite the `current` pointer in one atomic operation.
        `before_flip` (tests, canaries) runs after the version is complete and before the flip.
        """
        src = Path(src_dir)
        if not src.is_dir() or not any(src.iterdir()):
            raise ValueError(f"src_dir {src} is not a directory with adapter files")
        udir = self._user_dir(tenant_id, user_id)
        with self._user_lock(udir):
            self._clean_staging(udir)
            existing = self._version_numbers(udir, complete_only=False)
            version = (existing[-1] if existing else 0) + 1
            vdir = f"{udir}/{version_dir(version)}"
            staging = f"{udir}/{_STAGING_PREFIX}{uuid.uuid4().hex}"
            body = manifest.model_dump_json(indent=2).encode()
            files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.name != MANIFEST]
            if self.local:
                Path(staging).mkdir(parents=True)
                for p in files:
                    dst = Path(staging) / p.relative_to(src)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dst)
                _write_local(Path(staging) / MANIFEST, body)
                os.rename(staging, vdir)  # atomic; fails if vdir appeared meanwhile
            else:
                # Object stores have no directory rename: upload, copy into place, manifest last.
                for p in files:
                    self.fs.put_file(str(p), f"{staging}/{p.relative_to(src).as_posix()}")
                for p in files:
                    rel = p.relative_to(src).as_posix()
                    self.fs.copy(f"{staging}/{rel}", f"{vdir}/{rel}")
                self.fs.pipe_file(f"{vdir}/{MANIFEST}", body)
                self.fs.rm(staging, recursive=True)
            published = AdapterVersion(tenant_id=tenant_id, user_id=user_id, version=version,
                                       uri=self._uri(vdir), manifest=manifest)
            if before_flip is not None:
                before_flip(published)
            self._flip(udir, version)
            self._prune(udir, version)
        log.info("published adapter %s", published.name)
        return published

    def _flip(self, udir: str, version: int) -> None:
        body = json.dumps({"version": version, "name": version_dir(version),
                           "updated_at": datetime.now(UTC).isoformat()}).encode()
        if self.local:
            _write_local(Path(udir) / POINTER, body)  # write temp + os.replace: atomic
        else:
            self.fs.pipe_file(f"{udir}/{POINTER}", body)  # one PUT: atomic on object stores

    def _prune(self, udir: str, current: int) -> None:
        nums = self._version_numbers(udir, complete_only=False)
        keep = set(nums[-self.keep_versions:]) | {current}
        for n in nums:
            if n not in keep:
                self.fs.rm(f"{udir}/{version_dir(n)}", recursive=True)
                log.info("pruned adapter version %s/%s", udir, version_dir(n))

    def _clean_staging(self, udir: str) -> None:
        """Remove staging directories a crashed publisher left behind (older than an hour)."""
        try:
            entries = self.fs.ls(udir, detail=True)
        except FileNotFoundError:
            return
        now = time.time()
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(_STAGING_PREFIX):
                continue
            mtime = e.get("mtime") or e.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if now - float(mtime or 0) > _STALE_STAGING_S:
                self.fs.rm(e["name"], recursive=True)

    def delete_user(self, tenant_id: str, user_id: str) -> int:
        """Forget a user's adapters (every version, the pointer, the local cache); returns how many
        versions were deleted. Idempotent."""
        udir = self._user_dir(tenant_id, user_id)
        n = len(self._version_numbers(udir, complete_only=False))
        if self.fs.exists(udir):
            self.fs.rm(udir, recursive=True)
        shutil.rmtree(self.cache_dir / tenant_id / user_id, ignore_errors=True)
        return n


def _write_local(path: Path, body: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "root"


def registry_from_settings(settings: Any) -> AdapterRegistry:
    """The registry configured in `settings.adapters` (root defaults to `<data_dir>/adapters`)."""
    return AdapterRegistry(settings.adapter_root, keep_versions=settings.adapters.keep_versions)
