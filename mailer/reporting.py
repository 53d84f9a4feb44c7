"""What a sending pass tells whoever runs it, apart from the log.

The commands print what their passes did whatever the site's ``LOGGING``
says: a site without any still learns that the mail server is down. The
engine tells the observer in place (``observer()``); it does nothing unless
a command puts one of its own in place with ``observing``.

The observer is one for the whole process, not one per thread: the senders
of a pass run on threads of their own (``mailer.workers``), and call it from
there, so an observer must be thread-safe.
"""

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailer.models import Message


class Observer:
    """Hears what a pass does; this one ignores it all. Methods are called from any sender thread."""

    def paused(self) -> None:
        """The pass did not run: ``MAILER_PAUSE_SEND`` is on."""

    def lock_held(self) -> None:
        """The pass did not run: another run holds the lock file."""

    def pass_started(self) -> None:
        """A pass begins (the lock is taken)."""

    def message_handled(self, pk: int, message: "Message | None", status: str) -> None:
        """Message ``pk`` ended the pass "sent", "deferred", "failed" or "dont_send" (``message`` None: unreadable)."""

    def server_unreachable(self, server: str, reason: str) -> None:
        """The mail server cannot be reached: the pass, or delivery on its route, ends; its mail waits."""

    def pass_ended(self, counts: Counter[str], seconds: float) -> None:
        """A pass ended normally, with ``counts`` (see ``engine.send_all``), after ``seconds``."""

    def pass_failed(self, error: BaseException) -> None:
        """A pass, or the look at the queue before it, ended with ``error`` (it is raised after this)."""


_observer = Observer()


def observer() -> Observer:
    """The observer the engine tells, for now."""
    return _observer


@contextlib.contextmanager
def observing(new: Observer) -> Iterator[Observer]:
    """Have the engine tell ``new`` until the block ends."""
    global _observer
    previous, _observer = _observer, new
    try:
        yield new
    finally:
        _observer = previous
