"""Several senders in one pass, and what they share.

A pass sends over one delivery connection by default. ``run_side_by_side``
runs several senders at once, each on a thread of its own with its own
delivery connection, database connection and claims, for mail servers that
take tens or hundreds of milliseconds per message.

``Progress`` is what the senders of one pass share: the counts, the limits
of ``MAILER_EMAIL_MAX_BATCH`` and ``MAILER_EMAIL_MAX_DEFERRED``, the throttle,
the routes found down, the sessions each route has open, and whether the
pass has ended.
"""

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from django.db import DatabaseError, connections

from mailer import conf, stopping

# The pass's own doings, logged as the engine's: sites and the docs know the engine's logger.
logger = logging.getLogger("mailer.engine")

# How often a waiting thread looks whether the pass has been asked to stop.
STOP_CHECK_INTERVAL = 0.2


class Progress:
    """The counts, limits, throttle and end of one pass, shared by its senders.

    The limits and the throttle are read from the settings when the pass
    begins: they hold for the whole pass, and the next pass reads them
    again. Reading a setting the site leaves unset costs microseconds that
    a pass would otherwise spend several times on every message.
    """

    def __init__(self, routes: Iterable[str | None] = (None,)) -> None:
        self.counts: Counter[str] = Counter()
        self.ended = False
        self.max_batch: int | None = conf.get_setting("MAILER_EMAIL_MAX_BATCH")
        self.max_deferred: int | None = conf.get_setting("MAILER_EMAIL_MAX_DEFERRED")
        self.throttle_seconds: float = conf.get_setting("MAILER_EMAIL_THROTTLE") or 0
        self._lock = threading.Lock()
        self._sending = 0
        self._next_turn = 0.0
        # The routes mail of this pass may take (None: the default one), those whose mail server cannot be
        # reached, and how many sessions the senders have open, or are opening, on each.
        self.routes = frozenset(routes)
        self._down: set[str | None] = set()
        self._sessions: Counter[str | None] = Counter()

    def may_send(self) -> bool:
        """Take a turn to send one message; False once the pass has ended or its limit is reached.

        Messages being sent count towards ``MAILER_EMAIL_MAX_BATCH``, so that
        several senders together never send more than it allows.
        """
        while self.wait_for_room():
            with self._lock:
                if self.ended:
                    return False
                if self._room() != 0:  # unless another sender took the last place meanwhile
                    self._sending += 1
                    return True
        return False

    def wait_for_room(self) -> bool:
        """Wait while messages being sent alone fill ``MAILER_EMAIL_MAX_BATCH`` (they may fail); return False
        once the pass has ended or its limit is reached.
        """
        while True:
            with self._lock:
                if self.ended:
                    return False
                if self._room() != 0:
                    return True
                if not self._sending:
                    return False
            if stopping.stop_requested():
                return False
            time.sleep(0.01)

    def room(self) -> int | None:
        """How many more messages the pass may send now (those being sent count), or None without a limit."""
        with self._lock:
            return 0 if self.ended else self._room()

    def _room(self) -> int | None:
        if self.max_batch is None:
            return None
        return max(0, int(self.max_batch) - self.counts["sent"] - self._sending)

    def finished(self, status: str | None, ends_pass: bool = False) -> None:
        """Count how the message of a turn ended (None: it was gone), and end the pass if that says so."""
        with self._lock:
            self._sending -= 1
            if status is None:
                return
            self.counts[status] += 1
            if ends_pass or (not self.ended and self._limit_reached()):  # said once, by the sender that reached it
                self.ended = True

    def _limit_reached(self) -> bool:
        if self.max_batch is not None and self.counts["sent"] >= self.max_batch:
            logger.info("EMAIL_MAX_BATCH (%s) reached, stopping for this round", self.max_batch)
            return True
        failures = self.counts["deferred"] + self.counts["failed"]
        if self.max_deferred is not None and failures >= self.max_deferred:
            logger.warning("EMAIL_MAX_DEFERRED (%s) reached, stopping for this round", self.max_deferred)
            return True
        return False

    def end(self) -> None:
        with self._lock:
            self.ended = True

    def route_down(self, route: str | None) -> bool:
        """Remember that the mail server of ``route`` cannot be reached; return whether that ends the pass.

        It does once every route the pass may use is down: with one route
        (no ``MAILERS`` routing, the common case), at the first outage.
        """
        with self._lock:
            self._mark_down(route)
            return self.ended

    def first_to_find_down(self, route: str | None) -> bool:
        """Remember that ``route``'s mail server cannot be reached; return whether no sender had found it so
        before (that sender reports the outage and sets back its message; the others give theirs back).
        """
        with self._lock:
            first = route not in self._down
            self._mark_down(route)
            return first

    def _mark_down(self, route: str | None) -> None:
        self._down.add(route)
        if self.routes <= self._down:
            self.ended = True

    def routes_down(self) -> frozenset[str | None]:
        with self._lock:
            return frozenset(self._down)

    def session_opening(self, route: str | None) -> None:
        """A sender is opening a session on ``route``; it counts until ``session_closed``."""
        with self._lock:
            self._sessions[route] += 1

    def session_closed(self, route: str | None) -> None:
        with self._lock:
            self._sessions[route] -= 1

    def opening_failed(self, route: str | None) -> bool:
        """A sender could not open a session on ``route``; return whether other senders have one open there,
        or are opening one (the caller tells a refusal, which proves the server is there, from a timeout).
        """
        with self._lock:
            self._sessions[route] -= 1
            return self._sessions[route] > 0

    def take_turn(self) -> None:
        """Wait for a turn to begin a message under ``MAILER_EMAIL_THROTTLE``: one message per that many seconds,
        whatever the number of senders, from the first message of the pass on.
        """
        if not self.throttle_seconds:
            return
        with self._lock:
            now = time.monotonic()
            turn = max(self._next_turn, now)
            self._next_turn = turn + self.throttle_seconds
        sleep(turn - now)

    def throttle(self) -> None:
        """Wait, after a message, until that many seconds after it ended (or the next turn, if later).

        With one sender this is django-mailer's sleep after each message.
        """
        if not self.throttle_seconds:
            return
        with self._lock:
            self._next_turn = max(self._next_turn, time.monotonic() + self.throttle_seconds)
            wait = self._next_turn - time.monotonic()
        sleep(wait)


def run_side_by_side(
    senders: list[Callable[[], None]],
    progress: Progress,
    give_back: Callable[[], None] | None = None,
    database: str | None = None,
) -> None:
    """Run each of ``senders`` on a thread of its own, all at once, and wait for them all; raise the first error
    any raised.

    An error in one sender ends the pass for all (each finishes the message
    it is sending), but for one: a sender that cannot connect to the
    ``database`` (the server's or the role's limit of connections reached)
    steps aside before it claims anything, and the others go on; the pass
    fails only if none could. Each thread closes its database connections at
    the end.
    If waiting is cut short (a second SIGTERM or SIGINT raises
    ``KeyboardInterrupt`` here, in the main thread), ``give_back`` is called
    before the exception goes on: the threads die with the process, and
    what they claimed but had not begun should not wait for its claims to lapse.
    """
    errors: list[BaseException] = []
    unconnected: list[BaseException] = []

    def sender(send: Callable[[], None]) -> None:
        try:
            if database is not None:
                try:
                    connections[database].ensure_connection()
                except DatabaseError as exc:
                    unconnected.append(exc)
                    logger.warning("a sender could not connect to the database (%s); the others go on", exc)
                    return
            send()
        except BaseException as exc:
            errors.append(exc)
            progress.end()
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=sender, args=(send,), name=f"mailer-sender-{n}", daemon=True)
        for n, send in enumerate(senders)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            # Joined in short steps, so that the main thread handles signals meanwhile.
            while thread.is_alive():
                thread.join(STOP_CHECK_INTERVAL)
    except BaseException:
        progress.end()
        if give_back is not None:
            give_back()
        raise
    if errors:
        raise errors[0]
    if len(unconnected) == len(threads):
        raise unconnected[0]


def sleep(seconds: float) -> None:
    """Sleep ``seconds``, in short steps, so that a request to stop is seen within one."""
    deadline = time.monotonic() + seconds
    while not stopping.stop_requested() and (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, STOP_CHECK_INTERVAL))
