"""A replay cache on disk, shared by the processes of a node and kept across its restarts.

A node checks each token's nonce against the ones it accepted within the token's window. Kept
only in memory, that record is lost when the node restarts (a token captured just before could
be replayed just after) and is one per process (with ``--workers N``, a captured request could
be replayed once on every other worker). The table is a file in the node's state directory
(``replay.table``, 0600), mapped by every process that uses that directory: two arrays of
``SLOTS`` entries, the fingerprints of ``(key id, nonce)`` (8 bytes) and the time each may be
forgotten (a float, UNIX seconds). A nonce's fingerprint picks a window of ``PROBE`` slots; a
claim looks for the fingerprint there (a replay while it has not expired) and otherwise takes
the first slot that is free or expired. Every claim holds an exclusive ``flock`` on the file
(each worker opens the file itself, so the lock excludes the other processes).

It fails closed: a window whose every slot is held by a live nonce refuses the login (the
caller reports it as "too many logins"), never forgets a live nonce to make room.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
from pathlib import Path

from homenet.node.log import fields
from homenet.node.settings import Settings

log = logging.getLogger("homenet.replay")

#: Slots in the table (4 MiB on disk): a node accepting 1,000 signed requests a second keeps
#: 120,000 live nonces (a 2-minute window), under half of it.
SLOTS = 1 << 18
#: Slots one fingerprint may occupy: enough that a window fills only when the table is
#: nearly full.
PROBE = 64
_ENTRY = 16  # 8 bytes of fingerprint + 8 of expiry, in two arrays


class ReplayTableFull(Exception):
    """Every slot a nonce may take holds a live nonce: refuse the login, keep the others."""


def fingerprint(key_id: str, nonce: str) -> int:
    """A non-zero 64-bit fingerprint of a key's nonce (0 marks a free slot)."""
    digest = hashlib.blake2b(f"{key_id}\n{nonce}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class ReplayTable:
    """The shared table, mapped from ``path`` (made by :meth:`create`)."""

    def __init__(self, path: str | Path, slots: int = SLOTS, probe: int = PROBE) -> None:
        if slots <= probe:
            raise ValueError("a replay table needs more slots than its probe window")
        self.path = str(path)
        self.slots = slots
        self.probe = probe
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(self._fd).st_size != slots * _ENTRY:
                raise ValueError(f"replay table {self.path} is not {slots} slots")
            self._map = mmap.mmap(self._fd, slots * _ENTRY)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self._prints = self._view[: slots * 8].cast("Q")
        self._expiry = self._view[slots * 8 :].cast("d")

    @staticmethod
    def create(path: str | Path, slots: int = SLOTS) -> None:
        """Make an empty table file (mode 0600) at ``path``, atomically: a process that finds
        the file finds it whole. Raises FileExistsError if there is one already."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, slots * _ENTRY)  # zeros: every slot free
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is the one
        finally:
            os.unlink(tmp)

    @classmethod
    def at(cls, path: str | Path) -> ReplayTable:
        """The table at ``path``, made if there is none yet."""
        with contextlib.suppress(FileExistsError):
            cls.create(path)
        return cls(path)

    def claim(self, key_id: str, nonce: str, now: float, until: float) -> bool:
        """Record ``key_id``'s ``nonce`` as used until ``until``: False if a process of this node
        already accepted it and it has not expired (a replay). Raises :class:`ReplayTableFull`."""
        fp = fingerprint(key_id, nonce)
        base = fp % (self.slots - self.probe)
        end = base + self.probe
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            prints = self._prints[base:end].tolist()
            expiry = self._expiry[base:end].tolist()
            if fp in prints and any(p == fp and e > now for p, e in zip(prints, expiry, strict=True)):
                return False
            for i, forget_at in enumerate(expiry):
                if forget_at <= now:
                    self._prints[base + i] = fp
                    self._expiry[base + i] = until
                    return True
            raise ReplayTableFull
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap and close (the file stays for the other processes)."""
        self._prints.release()
        self._expiry.release()
        self._view.release()
        self._map.close()
        os.close(self._fd)


def replay_path(settings: Settings, fallback: Path | None = None) -> Path:
    """Where a node keeps its replay table: ``STATE_DIR/replay.table``, made now if missing;
    ``fallback`` (a private directory) when the state directory cannot hold it (read-only)."""
    path = Path(settings.state_dir) / "replay.table"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            ReplayTable.create(path)
        return path
    except OSError as exc:
        if fallback is None:
            raise
        log.warning("replay.not_kept", extra=fields(path=str(path), error=exc.strerror or str(exc)))
        path = fallback / "replay.table"
        with contextlib.suppress(FileExistsError):
            ReplayTable.create(path)
        return path
