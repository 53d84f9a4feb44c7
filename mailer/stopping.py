"""Stopping a sending process gracefully: SIGTERM, SIGINT and SIGHUP.

What systemd, Docker, Kubernetes and Ctrl-C send. The first signal asks the
process to stop: the pass finishes (and records) the message in flight,
sends no other, releases its claims and the lock, and the command exits 0.
A second signal stops it at once (``KeyboardInterrupt``); the claims of a
message it was sending lapse by themselves.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

_requested = threading.Event()


def stop_requested() -> bool:
    """Return whether the process has been asked to stop."""
    return _requested.is_set()


def handling_signals() -> bool:
    """Return whether a signal can ask for a stop now (inside ``stopping_on_signals``)."""
    return any(signal.getsignal(signum) is _on_signal for signum in SIGNALS)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt(f"stopped by a second {signal.Signals(signum).name}")
    _requested.set()


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within the block, the signals ask for a graceful stop; afterwards they do what they did before.

    Signal handlers can only be set in the main thread: elsewhere the block
    runs with the signals as they are.
    """
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal the process was told to ignore (nohup ignores SIGHUP) stays ignored.
    handled = [signum for signum in SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, _on_signal) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested.clear()
