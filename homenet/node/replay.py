"""A replay cache shared by the processes of one node (``homenet node --workers N``).

Each worker checks tokens itself; without a shared record of the nonces it accepted, a captured
signed request could be replayed once on every other worker within its window. The table is a
file in the supervisor's private (0700) directory, mapped by every worker: two arrays of
``SLOTS`` entries, the fingerprints of ``(key id, nonce)`` (8 bytes) and the time each may be
forgotten (a float, UNIX seconds). A nonce's fingerprint picks a window of ``PROBE`` slots; a
claim looks for the fingerprint there (a replay while it has not expired) and otherwise takes
the first slot that is free or expired. Every claim holds an exclusive ``flock`` on the file
(each worker opens the file itself, so the lock excludes the other processes).

It fails closed: a window whose every slot is held by a live nonce refuses the login (the
caller reports it as "too many logins"), never forgets a live nonce to make room.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from pathlib import Path

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
        """Make an empty table file (mode 0600) at ``path``."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, slots * _ENTRY)  # zeros: every slot free
        finally:
            os.close(fd)

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
