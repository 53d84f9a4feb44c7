"""Real second holders of the lock file, for the tests of what a pass does when it is taken.

lockfile tells owners apart by host, process and thread, so a lock taken in
a thread of its own is held against the engine exactly as one taken by
another process on the same host.
"""

import threading
import time

import lockfile

JOIN_TIMEOUT = 10


class LockHolder:
    """Holds ``lockfile.FileLock(path)`` from a thread of its own until released."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock: lockfile.FileLock | None = None
        self.released_at: float | None = None
        self._held = threading.Event()
        self._release = threading.Event()
        self._hold_for: float | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name=f"lock holder {path}", daemon=True)

    def start(self, hold_for: float | None = None) -> "LockHolder":
        """Take the lock (it must be free); let it go after ``hold_for`` seconds, or when ``release`` is called."""
        self._hold_for = hold_for
        self._thread.start()
        if not self._held.wait(JOIN_TIMEOUT):
            raise AssertionError(f"the holder could not take {self.path}: {self._error!r}")
        return self

    def _hold(self) -> None:
        try:
            # Made in this thread, so lockfile sees an owner other than the engine's.
            self.lock = lockfile.FileLock(self.path)
            self.lock.acquire(0)
        except BaseException as exc:
            self._error = exc
            return
        self._held.set()
        self._release.wait(self._hold_for)
        self.released_at = time.monotonic()
        self.lock.release()

    def still_holds_it(self) -> bool:
        """Whether the lock file is there and is this holder's own."""
        return self.lock is not None and self.lock.i_am_locking()

    def release(self) -> None:
        """Let the lock go now (if it is still held) and wait for the thread to end."""
        self._release.set()
        self.join()

    def join(self) -> None:
        if self._thread.ident is None:
            return
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), f"the holder of {self.path} did not end"


def lock_is_free(path: str) -> bool:
    """Whether another owner could take the lock file at ``path`` right now (it is taken and given back at once).

    The check runs in a thread of its own: from the engine's thread, lockfile
    would mistake a lock the engine forgot to release for its own.
    """
    outcome: list[bool] = []

    def probe() -> None:
        lock = lockfile.FileLock(path)
        try:
            lock.acquire(0)
        except lockfile.AlreadyLocked:
            outcome.append(False)
            return
        lock.release()
        outcome.append(True)

    thread = threading.Thread(target=probe, name=f"lock probe {path}")
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), f"probing {path} did not end"
    assert outcome, f"probing {path} failed"
    return outcome[0]
