"""Ending, with a real signal, code that never returns by itself (``send_loop``, ``runmailer``).

A SIGALRM handler runs in the main thread between two steps of the code
under test, and raises there: ``KeyboardInterrupt`` is what Ctrl-C raises
in ``runmailer``.
"""

import contextlib
import signal
import time
from collections.abc import Callable, Iterator

POLL = 0.02


@contextlib.contextmanager
def raise_when(
    condition: Callable[[], bool], exception: type[BaseException] = KeyboardInterrupt, give_up_after: float = 10
) -> Iterator[None]:
    """Raise ``exception`` in the main thread as soon as ``condition()`` holds, or after ``give_up_after`` seconds.

    The test then checks that the condition held: giving up is there so that
    a broken loop fails the test instead of hanging the run.
    """
    deadline = time.monotonic() + give_up_after

    def check(signum, frame):
        met = condition()
        if met or time.monotonic() > deadline:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise exception("condition met" if met else f"condition still not met after {give_up_after} s")

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, POLL, POLL)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def time_limit(seconds: float) -> contextlib.AbstractContextManager[None]:
    """Raise TimeoutError in the main thread if the block is still running after ``seconds``."""
    return raise_when(lambda: False, TimeoutError, give_up_after=seconds)
