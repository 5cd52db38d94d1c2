"""Closed sessions waiting for memory evolution in one gateway replica: a bounded FIFO drained by
one thread (a user's sessions are evolved in the order they closed), with `forget` that drops a
user's queued sessions and waits for the one in progress."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from services.serve import metrics

log = logging.getLogger(__name__)

SessionKey = tuple[str, str, str]  # (tenant, user, session)


class QueueFullError(Exception):
    pass


class SessionQueue:
    def __init__(self, process: Callable[[str, str, str], Any], maxsize: int) -> None:
        self._process = process
        self.maxsize = maxsize
        self._items: deque[SessionKey] = deque()
        self._active: SessionKey | None = None
        self._failed: dict[tuple[str, str], dict[str, str]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def free(self) -> int:
        with self._cond:
            return self.maxsize - len(self._items)

    def put_many(self, keys: Iterable[SessionKey]) -> list[SessionKey]:
        """Queue sessions not already waiting; QueueFullError (nothing queued) if they do not fit."""
        with self._cond:
            new = [k for k in dict.fromkeys(keys) if k not in self._items and k != self._active]
            if len(self._items) + len(new) > self.maxsize:
                raise QueueFullError(f"{len(self._items)} sessions already wait for memory evolution")
            self._items.extend(new)
            metrics.SESSION_QUEUE.set(len(self._items))
            if new:
                self._ensure_thread()
                self._cond.notify_all()
            return new

    def pending(self, tenant: str, user: str) -> int:
        with self._cond:
            n = sum(1 for t, u, _ in self._items if (t, u) == (tenant, user))
            return n + int(self._active is not None and self._active[:2] == (tenant, user))

    def failed(self, tenant: str, user: str) -> dict[str, str]:
        with self._cond:
            return dict(self._failed.get((tenant, user), {}))

    def forget(self, tenant: str, user: str, timeout_s: float = 600.0) -> int:
        """Drop the user's queued sessions and wait until none of theirs is being processed."""
        with self._cond:
            before = len(self._items)
            self._items = deque(k for k in self._items if k[:2] != (tenant, user))
            self._failed.pop((tenant, user), None)
            metrics.SESSION_QUEUE.set(len(self._items))
            done = self._cond.wait_for(lambda: self._active is None or self._active[:2] != (tenant, user),
                                       timeout=timeout_s)
            if not done:
                raise TimeoutError(f"a session of {tenant}/{user} is still being processed")
            return before - len(self._items)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="session-evolution", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stop)
                if self._stop:
                    return
                key = self._active = self._items.popleft()
                metrics.SESSION_QUEUE.set(len(self._items))
            try:
                self._process(*key)
                metrics.SESSIONS.labels("done").inc()
                with self._cond:
                    self._failed.get(key[:2], {}).pop(key[2], None)  # a retry that worked clears the failure
            except Exception as exc:  # keep draining: one bad session must not stall the others
                log.exception("memory evolution failed for %s/%s/%s", *key)
                metrics.SESSIONS.labels("failed").inc()
                with self._cond:
                    self._failed.setdefault(key[:2], {})[key[2]] = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
