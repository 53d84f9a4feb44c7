"""Drain the queue: claim a message, send it, record the outcome.

A pass (``send_all``) runs under the lock file and walks the queue in
priority order. Each message is

1. claimed in its own short UPDATE, marked with the pass's token and an
   expiry, so no other worker on any host takes it and a crashed worker's
   claim lapses by itself;
2. sent outside any transaction, over one connection that the pass opens
   once and reuses (a new one after a failure), so no database lock is held
   while the mail server is talking;
3. recorded in its own short transaction: a log row and the deletion, or a
   deferral.

Whatever goes wrong with one message is recorded on that message (deferred,
or failed for good after a 5xx refusal, with a failure log row saying why)
and the pass goes on to the next; a mail server that cannot be reached ends
the pass at once (with routing by mailer, delivery on its route: the other
routes go on); an error that concerns no single message (the database, the
configuration) ends it and is raised. ``mailer.failures`` says which error
is which.

Code written for django-mailer 2.x patches ``send_all``, ``prioritize``,
``acquire_lock``, ``release_lock``, ``logger``, ``lockfile.FileLock`` and
``time.sleep``; they are all looked up when called.
"""

import contextlib
import contextvars
import copy
import datetime
import logging
import os
import smtplib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import lockfile
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import DatabaseError, router, transaction
from django.db import connections as database_connections
from django.utils.module_loading import import_string

from mailer import conf, failures, locking, reporting, stopping, unfinished, workers
from mailer.codec import decode, storable_text
from mailer.delivery import (
    backend_path,
    check_delivery_route,
    delivery_route,
    get_delivery_connection,
    is_queue,
    mailers_configured,
    routing_alias,
)
from mailer.exceptions import ConfigurationError, SentButNotRecorded, UndecodableData, UnstorableEmail
from mailer.message_id import ensure_message_id, get_message_id
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    SENT_MARK,
    Claim,
    DontSendEntry,
    Message,
    MessageLog,
    StandInsNotFound,
    cannot_hold,
    datetime_now,
)
from mailer.recording import (
    RECORD_ASIDE_FROM,
    OverlappingRecorder,
    Recorder,
    discard,
    drop_if_broken,
    mark_sent,
    record_sent,
    recorder_for,
    records_aside,
)
from mailer.redaction import keeps_message_data, loggable

__all__ = [
    "SentButNotRecorded",
    "acquire_lock",
    "handle_delivery_exception",
    "prioritize",
    "release_lock",
    "send_all",
    "send_loop",
]

logger = logging.getLogger(__name__)

# Seconds after which a lock still held is worth a warning: its holder may
# have died on another host, where it cannot be told (mailer.locking).
LONG_HELD_LOCK = 3600

# How many messages a pass claims at once: about CLAIM_SECONDS of sending,
# so that claiming costs little per message when the mail server is fast,
# and another worker (another process, host or connection) soon finds the
# rest of the queue when it is slow. When the queue runs dry, the other
# workers have finished and wait on one worker's last claim: a short claim
# keeps that tail short. Behind a mail server taking 20 ms a message, 4
# processes sent 3.46-3.57 times as fast as one with claims of 0.5 s, and
# 3.64-3.75 times with 0.25 s (benchmarks/speed.py, figure 5, a few runs of
# each on one day).
CLAIM_SECONDS = 0.25
CLAIM_BATCH_MIN = 5
CLAIM_BATCH_MAX = 100
# A claim that finds every due message locked by other workers' claims looks
# again every CLAIM_RACE_PAUSE seconds for up to CLAIM_RACE_SECONDS.
CLAIM_RACE_SECONDS = 1.0
CLAIM_RACE_PAUSE = 0.005

# Each delivery connection of a pass holds a thread and a database connection
# of its own: more than this would exhaust the database sooner than it helps.
MAX_DELIVERY_CONNECTIONS = 64

# How much message data a pass reads from the database in one query (or records in one): small
# messages are read together, a large one alone, so memory stays flat.
READ_BYTES = 1024 * 1024

ErrorHandler = Callable[[BaseEmailBackend | None, Message, Exception], tuple[BaseEmailBackend | None, str]]

# django-mailer 2.x exposed these settings as module constants frozen at
# import; they are read from the settings whenever they are looked up.
_SETTING_ATTRIBUTES = {
    "EMPTY_QUEUE_SLEEP": "MAILER_EMPTY_QUEUE_SLEEP",
    "LOCK_WAIT_TIMEOUT": "MAILER_LOCK_WAIT_TIMEOUT",
    "LOCK_PATH": "MAILER_LOCK_PATH",
}


def __getattr__(name: str) -> Any:
    try:
        return conf.get_setting(_SETTING_ATTRIBUTES[name])
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def prioritize(queryset: Any = None) -> Any:
    """Return the messages of ``queryset`` (by default the non-deferred queue) in sending order."""
    if queryset is None:
        queryset = Message.objects.non_deferred()
    return queryset.order_by("priority", "when_added", "pk")


# A pass compiles its claim once only for this ``prioritize``: one that tests (or a site) patched in decides
# the order and the filter itself, looked up at each pass as in django-mailer.
_OWN_PRIORITIZE = prioritize


def acquire_lock() -> tuple[bool, Any]:
    """Take the lock file; return (whether it was taken, the lock)."""
    path = conf.get_setting("MAILER_LOCK_PATH") or "send_mail"
    logger.debug("acquiring lock...")
    lock = lockfile.FileLock(path)
    try:
        # Breaks the lock of a holder that was killed on this host.
        dead = locking.acquire(lock, conf.get_setting("MAILER_LOCK_WAIT_TIMEOUT"))
    except lockfile.AlreadyLocked:
        held_for = locking.held_for(lock)
        if held_for is not None and held_for > LONG_HELD_LOCK:
            logger.warning(
                "lock already in place for %d minutes. quitting. If no mailer process runs (on any host), "
                "delete %s.lock",
                held_for // 60,
                os.path.abspath(path),
            )
        else:
            # The normal overlap of two cron runs, not an error.
            logger.info("lock already in place. quitting.")
        return False, lock
    except lockfile.LockTimeout:
        logger.info("waiting for the lock timed out. quitting.")
        return False, lock
    except (lockfile.LockFailed, OSError) as exc:
        raise ConfigurationError(locking.describe_failure(path, exc)) from exc
    logger.debug("acquired.")
    if dead:
        _release_claims_of(dead)
    return True, lock


def _release_claims_of(pids: tuple[int, ...]) -> None:
    """Give back the claims of processes of this host that are dead, rather than wait for them to lapse.

    A killed pass leaves its claims on the few messages it had not sent yet;
    without this, they would wait ``MAILER_CLAIM_TIMEOUT``. Messages
    it marked as sent keep their mark.
    """
    namespace = locking.process_name().partition("@")[2]
    try:
        for pid in pids:
            released = (
                Message.objects.filter(claimed_by__endswith=f".{pid}@{namespace}")
                .exclude(claimed_by__startswith=SENT_MARK)
                .update(claimed_until=None)
            )
            if released:
                logger.warning("gave back the claims of process %s on %d message(s)", pid, released)
    except DatabaseError:
        logger.warning("could not give back the claims of process %s; they lapse by themselves", pid, exc_info=True)


def release_lock(lock: Any) -> None:
    logger.debug("releasing lock...")
    locking.release(lock)
    logger.debug("released.")


def handle_delivery_exception(
    connection: BaseEmailBackend | None, message: Message, exc: Exception
) -> tuple[BaseEmailBackend | None, str]:
    """Record why ``message`` could not be delivered; never raise.

    A refusal for good (5xx) sets the message aside as a permanent failure,
    which ``retry_deferred`` leaves alone; anything else defers it, or, with
    ``MAILER_RETRY_BACKOFF`` set, schedules its next attempt. Return the
    connection to go on with (None: open a new one) and "failed" or
    "deferred". ``MAILER_ERROR_HANDLER`` may name a replacement with the same
    contract.
    """
    failure = failures.understand(exc)
    if failure.permanent:
        message.fail_permanently(failure.reason)
        logger.warning("message failed permanently: %s", loggable(failure.reason, message))
        status = "failed"
    else:
        retry_at = _automatic_retry_time(message)
        if retry_at is None:
            message.defer(failure.reason)
            logger.info("message deferred due to failure: %s", loggable(failure.reason, message))
        else:
            message.retry_later(failure.reason, retry_at)
            logger.info("message will be tried again at %s: %s", retry_at, loggable(failure.reason, message))
        status = "deferred"
    # After a refusal smtplib has reset the session, which can go on; after
    # anything else it may be in any state.
    refusals = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError)
    return (connection if isinstance(exc, refusals) else None), status


def _check_retry_settings() -> None:
    """Refuse retry settings that would make every temporary failure an error, before anything is sent."""
    if conf.get_setting("MAILER_RETRY_BACKOFF") is None:
        return
    for name in ("MAILER_RETRY_BACKOFF", "MAILER_RETRY_BACKOFF_MAX"):
        value = conf.get_setting(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise ConfigurationError(f"{name} must be a number of seconds greater than 0, not {value!r}.")
    attempts = conf.get_setting("MAILER_RETRY_MAX_ATTEMPTS")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ConfigurationError(f"MAILER_RETRY_MAX_ATTEMPTS must be a whole number, 0 or more, not {attempts!r}.")


def _automatic_retry_time(message: Message) -> datetime.datetime | None:
    """Return when ``message`` should be tried again by itself, or None to wait for ``retry_deferred``."""
    first_delay = conf.get_setting("MAILER_RETRY_BACKOFF")
    if not first_delay or message.retry_count >= conf.get_setting("MAILER_RETRY_MAX_ATTEMPTS"):
        return None
    delay = min(first_delay * 2**message.retry_count, conf.get_setting("MAILER_RETRY_BACKOFF_MAX"))
    return datetime_now() + datetime.timedelta(seconds=delay)


def send_all(queryset: Any = None, *, connections: int | None = None) -> Counter[str] | None:
    """Make one pass over the queue (or over ``queryset``), under the lock file.

    ``connections`` delivery connections send side by side (by default
    ``MAILER_DELIVERY_CONNECTIONS``, 1), each with its own claims.

    Return how many messages ended each way ("sent", "deferred", "failed",
    "dont_send"), or None when the pass did not run because sending is
    paused or another process holds the lock. A message that cannot be sent
    never stops the pass; an error that concerns no single message (the
    database is gone, the configuration is wrong) ends it and is raised,
    after every claim and the lock are given back.
    """
    try:
        return _send_all(queryset, connections)
    except Exception as exc:
        reporting.observer().pass_failed(exc)
        raise


def _send_all(queryset: Any, connections: int | None) -> Counter[str] | None:
    check_delivery_route()
    _check_retry_settings()
    senders = _delivery_connections(connections)
    if conf.get_setting("MAILER_PAUSE_SEND"):
        logger.info("sending is paused, quitting.")
        reporting.observer().paused()
        return None
    error_handler = import_string(conf.get_setting("MAILER_ERROR_HANDLER"))

    use_file_lock = conf.get_setting("MAILER_USE_FILE_LOCK")
    if use_file_lock:
        acquired, lock = acquire_lock()
        if not acquired:
            reporting.observer().lock_held()
            return None
    started = time.monotonic()
    reporting.observer().pass_started()
    try:
        counts = _send_pass(queryset, error_handler, senders)
    finally:
        if use_file_lock:
            release_lock(lock)
    duration = time.monotonic() - started
    logger.info(
        "%d sent; %d deferred; %d failed permanently; %d not sent (don't send list); done in %.2f seconds",
        counts["sent"],
        counts["deferred"],
        counts["failed"],
        counts["dont_send"],
        duration,
        extra={"sent": counts["sent"], "deferred": counts["deferred"], "duration": duration},
    )
    reporting.observer().pass_ended(counts, duration)
    return counts


# send_loop tells this from a replacement that code written for django-mailer 2.x patched in.
_OWN_SEND_ALL = send_all


def _delivery_connections(given: int | None) -> int:
    """How many delivery connections a pass uses: ``given``, else ``MAILER_DELIVERY_CONNECTIONS``; checked."""
    name = "MAILER_DELIVERY_CONNECTIONS"
    count = conf.get_setting(name) if given is None else given
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_DELIVERY_CONNECTIONS:
        raise ConfigurationError(
            f"{name} (or --connections) must be a whole number from 1 to {MAX_DELIVERY_CONNECTIONS}, not {count!r}."
        )
    return count


def _send_pass(queryset: Any, error_handler: ErrorHandler, senders: int) -> Counter[str]:
    """Run one pass with ``senders`` delivery connections; return its counts."""
    unfinished.finish()  # what an earlier pass of this process could not write, first
    progress = workers.Progress(_routes_in_play())
    database = database_connections[Message.objects.db]
    # Other threads would not see this transaction's rows, nor share an in-memory database.
    shareable = not database.in_atomic_block and not (
        database.vendor == "sqlite" and cast(Any, database).is_in_memory_db()
    )
    if senders > 1 and not shareable:
        logger.warning("several delivery connections need a database outside a transaction; using one")
        senders = 1
    if senders == 1:
        SendingPass(queryset, error_handler, progress, kept=_KEPT_SESSIONS.get()).run()
    else:
        # Each records what it sent at once: at most one message per connection is ever sent but not recorded.
        passes = [SendingPass(queryset, error_handler, progress, unrecorded_at_most=1) for _n in range(senders)]
        workers.run_side_by_side(
            [sending_pass.run for sending_pass in passes],
            progress,
            give_back=lambda: _give_back_unbegun(passes),
            database=Message.objects.db,
        )
    return progress.counts


def _routes_in_play() -> frozenset[str | None]:
    """The routes queued mail may take: the default one (None) and, with ``MAILERS`` routing, that of each
    queueing mailer (``delivery.routing_alias``).
    """
    routes: set[str | None] = {None}
    if mailers_configured():
        routes.update(routing_alias(alias) for alias in settings.MAILERS if is_queue(backend_path(alias)))
    return frozenset(routes)


def _give_back_unbegun(passes: "list[SendingPass]") -> None:
    """Give back, one UPDATE per sender, the claims that the senders of a pass cut short have not begun.

    Not the messages they are sending, nor those sent and not yet recorded:
    those keep their claims until they lapse, so that no other worker sends
    them again meanwhile.
    """
    for sending_pass in passes:
        sending_pass.give_back_unbegun()


def send_loop(*, connections: int | None = None) -> None:
    """Send until asked to stop: a pass whenever a message is due, else sleep ``MAILER_EMPTY_QUEUE_SLEEP``.

    Each pass uses ``connections`` delivery connections (see ``send_all``).

    It also sleeps after a pass that sent nothing (sending paused, the lock
    held elsewhere, every message claimed by other workers, the mail server
    unreachable), rather than asking again at once, and after a pass that failed: the
    error is logged and the loop goes on, so a database restart or a
    mistake in the settings fixed on the fly does not need a restart.
    """
    while not stopping.stop_requested():
        _drop_broken_database_connections()
        # Looked up each time, and called as django-mailer called it unless told otherwise: code written
        # for it patches send_all.
        make_pass = send_all
        try:
            if unfinished.pending() or Message.objects.non_deferred().due(datetime_now()).exists():
                counts = make_pass() if connections is None else make_pass(connections=connections)
                if counts and counts["sent"]:
                    continue  # there may be more: look again at once
        except Exception as exc:
            if make_pass is not _OWN_SEND_ALL:
                # What a replacement raises means what its author meant: 2.x code (tests, mostly) ends
                # the loop this way, as django-mailer, which caught nothing here, let it.
                raise
            reporting.observer().pass_failed(exc)  # once: send_all's own report of it is the same error
            _drop_broken_database_connections(after_failure=True)
            logger.error(
                "the sending pass failed; trying again in %s seconds",
                conf.get_setting("MAILER_EMPTY_QUEUE_SLEEP"),
                exc_info=True,
            )
        _sleep_before_checking_again()


def _drop_broken_database_connections(after_failure: bool = False) -> None:
    """Let Django replace database connections that broke (a database restart) or grew too old; after a failed
    pass (``after_failure``), every one.

    What Django does around each web request; a connection inside a
    transaction (a test, a caller's atomic block) is left alone. After a
    failure the next pass starts on new connections, so that what the error
    left on one goes with it: with psycopg's prepared statements, a statement
    prepared before a migration changed its table fails ("cached plan must
    not change result type") on that connection until it is closed.
    """
    for connection in database_connections.all(initialized_only=True):
        if after_failure:
            discard(connection)
        else:
            drop_if_broken(connection)


def _sleep_before_checking_again() -> None:
    sleep = conf.get_setting("MAILER_EMPTY_QUEUE_SLEEP")
    logger.debug("sleeping for %s seconds before checking queue again", sleep)
    if stopping.handling_signals():
        workers.sleep(sleep)  # in short steps: a SIGTERM is answered within one, not after the whole sleep
    else:
        # Called directly (a site's own code, its tests), nothing can ask the loop to stop meanwhile: one
        # sleep, as django-mailer slept (its tests patch time.sleep and expect one call).
        time.sleep(sleep)


@dataclass(frozen=True)
class Outcome:
    """How one message ended in a pass: "sent", "deferred", "failed" or "dont_send"."""

    status: str
    # The mail server cannot be reached: the rest of the queue waits for the next pass.
    ends_pass: bool = False


# A message given back untouched (its claim released, no log row): its route's mail server cannot be reached,
# or will not take another session of the pass. It waits for the next pass, or another sender of this one.
GIVEN_BACK = Outcome("given back")


@dataclass
class Claimed:
    """A claimed message as read from the database, or why it could not be read."""

    pk: int
    message: Message | None = None  # None: deleted since it was claimed, or unloadable
    email: EmailMessage | None = None
    load_error: Exception | None = None  # the row itself cannot be returned by the database
    read_error: Exception | None = None  # the row is there but holds no usable email
    suppressed: list[str] = field(default_factory=list)  # its recipients on the don't-send list


class SendingPass:
    """One pass over the queue: its token (which marks its claims), its delivery connection, its counts.

    Messages are claimed a few at a time and read a few at a time (within
    ``READ_BYTES``), so a pass costs few queries per message however long
    the queue, and holds little memory however large the messages. Each
    message is handled in isolation: whatever goes wrong with it is
    recorded on it (deferred, with a failure log row) and the pass goes on.
    """

    def __init__(
        self,
        queryset: Any,
        error_handler: ErrorHandler,
        progress: workers.Progress,
        unrecorded_at_most: int = 2,
        kept: "KeptSessions | None" = None,
    ) -> None:
        self.queryset = queryset
        self.error_handler = error_handler
        self.progress = progress
        # Sent messages not recorded yet, with the notes for their log rows: at most unrecorded_at_most.
        self.unrecorded: list[tuple[Message, str]] = []
        self.unrecorded_at_most = unrecorded_at_most
        # On a database server, what the pass sends is recorded on a connection of its own, once enough
        # messages wait to be sent (``RECORD_ASIDE_FROM``).
        self.recorder: Recorder | OverlappingRecorder | None = None
        self.records_aside: bool | None = None  # whether it does (None: not known yet)
        # Which process holds the claims, so that its claims can be given back if it is killed.
        self.token = f"{uuid.uuid4().hex}.{locking.process_name()}"
        # The delivery connection of the route of the message at hand (``route``, a MAILERS alias or None for
        # the default one); those of the other routes the pass used wait in ``idle``, still open, for later messages.
        self.connection: BaseEmailBackend | None = None
        self.connection_open = False
        self.route: str | None = None
        self.idle: dict[str | None, BaseEmailBackend] = {}
        # The claims not yet handled, and until when they hold; the main thread may give them back
        # (``give_back_unbegun``), under ``held_lock``, when a second signal cuts the pass short.
        self.held: list[int] = []
        self.held_until = datetime_now()
        # How long claims hold (read once, as the pass's other settings), and when to extend them next
        # (``time.time``): once half that time has passed.
        self.claim_timeout = datetime.timedelta(seconds=conf.get_setting("MAILER_CLAIM_TIMEOUT"))
        self.extend_claims_at = 0.0
        self.held_lock = threading.Lock()
        self.abandoned = False
        # The routes on which this sender has a session open (or is opening one), counted in ``progress``.
        self.sessions: set[str | None] = set()
        # The mail server would not take one more session from this sender while others have theirs: it stops.
        self.retired = False
        self.sizes: dict[int, int] = {}  # the length of the message data of each claimed message
        self.claim_size = CLAIM_BATCH_MIN
        # What the last claim read on the way (PostgreSQL): claimed rows not read yet, and whether the
        # don't-send list was empty and messages waited to be recorded (None: not known).
        self.read_with_claim: dict[int, Message] = {}
        # Where the sessions of earlier passes wait, and this pass leaves its own (runmailer_pg).
        self.kept = kept
        self.dont_send_list_empty = False
        self.sent_unrecorded: bool | None = None

    def run(self) -> None:
        ended_well = False
        try:
            self._take_kept_sessions()
            earlier_sends_recorded = False
            while not self.retired and self.progress.wait_for_room() and not _asked_to_stop() and self._claim_next():
                claimed, started = len(self.held), time.monotonic()
                try:
                    if not earlier_sends_recorded:
                        # Before sending anything, with the claims held (the claim said whether there are any).
                        if self.sent_unrecorded is not False:
                            _record_earlier_sends(self.token)
                        earlier_sends_recorded = True
                    self._send_claimed()
                finally:
                    self._release_held()
                self._size_claims(claimed, time.monotonic() - started)
            if not earlier_sends_recorded:  # nothing to send: they are recorded all the same
                _record_earlier_sends(self.token)
            ended_well = True
        finally:
            try:
                try:
                    self._record_unrecorded()
                finally:
                    if self.recorder is not None:
                        self.recorder.close()
            finally:
                self._drop_connections(keep=ended_well and not stopping.stop_requested())

    def _take_kept_sessions(self) -> None:
        """Begin with the sessions earlier passes left open (``KeptSessions``): the default route's at hand."""
        if self.kept is None:
            return
        sessions = self.kept.take()
        for route in sessions:
            self.sessions.add(route)
            self.progress.session_opening(route)
        self.connection = sessions.pop(None, None)
        self.connection_open = self.connection is not None
        self.idle = sessions

    def _claim_next(self) -> bool:
        """Claim the next few due messages of the queue, in sending order; return whether there were any.

        A message this pass has already tried keeps its ``claimed_by`` token,
        so a failure that leaves it in the queue is not tried twice in one pass.
        """
        deadline = time.monotonic() + CLAIM_RACE_SECONDS
        whole_queue = self.queryset is None and prioritize is _OWN_PRIORITIZE and not self.progress.routes_down()
        untried = None  # built when needed: building it costs more than a claim compiled once
        while True:
            now = datetime_now()
            self._hold_claims_until(now + self.claim_timeout)
            claim = self._claim_compiled(now) if whole_queue else None
            if claim is None or not claim.taken:
                if untried is None:
                    untried = self._skipping_routes_down(prioritize(self.queryset).exclude(claimed_by=self.token))
                candidates = untried.due(now).claimable(now)
                if claim is None:
                    claim = candidates.claim_and_read(self.token, self.held_until, self._claims_wanted(), READ_BYTES)
            # Nothing claimed does not mean nothing left: another worker's claim may have held every row
            # for a moment (MariaDB locks all the rows it sorts, not only those it takes). Look again.
            if claim.taken or time.monotonic() > deadline or _asked_to_stop() or not candidates.exists():
                break
            time.sleep(CLAIM_RACE_PAUSE)
        self.held = [pk for pk, _size in claim.taken]
        self.sizes = {pk: size or 0 for pk, size in claim.taken}
        self.read_with_claim = claim.messages
        self.dont_send_list_empty = claim.dont_send_list_empty
        self.sent_unrecorded = claim.sent_unrecorded
        return bool(self.held)

    def _claim_compiled(self, now: datetime.datetime) -> Claim | None:
        """Claim from the whole queue with the query compiled once (``_whole_queue``); None where it cannot be."""
        candidates, stand_ins = _whole_queue()
        if not candidates.claims_in_one_statement():
            return None
        token_stand_in, due_stand_in, claimable_stand_in = stand_ins
        try:
            return candidates.claim_and_read(  # type: ignore[no-any-return]
                self.token,
                self.held_until,
                self._claims_wanted(),
                READ_BYTES,
                stand_ins={token_stand_in: self.token, due_stand_in: now, claimable_stand_in: now},
            )
        except StandInsNotFound:  # a Django that compiles them otherwise: the query built each time, then
            return None

    def _skipping_routes_down(self, queryset: Any) -> Any:
        """Leave out of ``queryset`` the messages of routes whose mail server cannot be reached in this pass."""
        down = self.progress.routes_down()
        if not down:
            return queryset
        if None in down:  # the default route: what is left is the mail of the other routes, by their aliases
            return queryset.filter(mailer_alias__in=[route for route in self.progress.routes - down if route])
        return queryset.exclude(mailer_alias__in=list(down))

    def _claims_wanted(self) -> int:
        """How many messages to claim next: no more than ``MAILER_EMAIL_MAX_BATCH`` leaves to send."""
        room = self.progress.room()
        return self.claim_size if room is None else max(1, min(self.claim_size, room))

    def _size_claims(self, handled: int, seconds: float) -> None:
        """Claim about ``CLAIM_SECONDS`` of sending next time, at the pace of the batch just sent."""
        if handled and seconds > 0:
            self.claim_size = max(CLAIM_BATCH_MIN, min(CLAIM_BATCH_MAX, int(CLAIM_SECONDS * handled / seconds)))

    def _send_claimed(self) -> None:
        for group in self._read_groups():
            for claimed in self._read(group):
                if _asked_to_stop() or not self.progress.may_send():
                    return
                if self.progress.throttle_seconds:
                    self.progress.take_turn()  # what this sender sent is recorded: see below
                    if _asked_to_stop():
                        self.progress.finished(None)
                        return
                self._keep_claims()
                if not self._begin(claimed.pk):
                    self.progress.finished(None)
                    if self.abandoned:
                        return
                    continue  # its claim lapsed: another worker may have it now
                outcome = None
                try:
                    outcome = self._handle(claimed)
                finally:
                    # None: deleted since it was claimed.
                    self.progress.finished(outcome.status if outcome else None, bool(outcome and outcome.ends_pass))
                if outcome is not None:
                    reporting.observer().message_handled(claimed.pk, claimed.message, outcome.status)
                if self.progress.ended or self.retired:
                    return
                if outcome is not None and self.progress.throttle_seconds:
                    # Not while holding messages sent but not recorded, whose claims might lapse meanwhile.
                    self._record_unrecorded()
                    self.progress.throttle()

    def _read_groups(self) -> Iterator[list[int]]:
        """Split the claimed ids into groups whose message data together stays within ``READ_BYTES``."""
        group: list[int] = []
        group_bytes = 0
        for pk in list(self.held):
            size = self.sizes.get(pk, 0)
            if group and group_bytes + size > READ_BYTES:
                yield group
                group, group_bytes = [], 0
            group.append(pk)
            group_bytes += size
        if group:
            yield group

    def _read(self, group: list[int]) -> list[Claimed]:
        """Read the claimed messages of ``group``, decode them, and drop recipients on the don't-send list.

        One query for the rows and one for the don't-send list, for the whole group.
        """
        rows = {pk: self.read_with_claim.pop(pk) for pk in group if pk in self.read_with_claim}
        try:
            unread = [pk for pk in group if pk not in rows]
            if unread:
                rows.update(Message.objects.in_bulk(unread))
        except (DatabaseError, ValueError, TypeError):
            # Some row cannot be returned (SQLite): find which, one by one.
            claimed = [Claimed(pk, rows[pk]) if pk in rows else _read_one(pk) for pk in group]
        else:
            claimed = [Claimed(pk, rows.get(pk)) for pk in group]
        for item in claimed:
            if item.message is not None:
                try:
                    item.email = _read_email(item.message)
                except Exception as exc:
                    if _database_in_trouble(exc):
                        raise
                    item.read_error = exc
        emails = {item.pk: item.email for item in claimed if item.email is not None}
        # The list may have grown since the messages were queued (unless it was empty when they were claimed).
        listed = set()
        if not self.dont_send_list_empty:
            listed = DontSendEntry.objects.suppressed_addresses(
                recipient for email in emails.values() for recipient in email.recipients()
            )
        for item in claimed:
            if item.pk in emails:
                item.suppressed = DontSendEntry.objects.remove_suppressed_recipients(emails[item.pk], listed)
        return claimed

    def _keep_claims(self) -> None:
        """Extend the claims still held once half their time has passed: a slow mail server must not let
        another worker take (and send again) what this pass claimed, nor what it sent and has yet to record.
        """
        if time.time() < self.extend_claims_at:
            return
        with self.held_lock:  # not while the main thread gives them back
            if self.abandoned:
                return
            until = datetime_now() + self.claim_timeout
            sent = [message.pk for message, _note in self.unrecorded]
            if self.recorder is not None:  # the message being recorded on its connection
                sent += [message.pk for message in self.recorder.pending()]
            Message.objects.filter(pk__in=self.held + sent, claimed_by=self.token).update(claimed_until=until)
            # Claims that lapsed meanwhile may be another worker's now: leave them.
            self.held = list(
                Message.objects.filter(pk__in=self.held, claimed_by=self.token, claimed_until=until).values_list(
                    "pk", flat=True
                )
            )
            self._hold_claims_until(until)

    def _hold_claims_until(self, until: datetime.datetime) -> None:
        """Note that the claims held now hold ``until``, and extend them once half their time has passed.

        Reckoned from ``until`` on the wall clock, as the claims lapse for the
        other workers: neither the time the claiming queries took, nor a pause
        of the machine (which the monotonic clock does not count), may eat into
        the time left.
        """
        self.held_until = until
        self.extend_claims_at = until.timestamp() - self.claim_timeout.total_seconds() / 2

    def _begin(self, pk: int) -> bool:
        """Take message ``pk`` off the claims not begun; False if its claim lapsed or they were given back."""
        with self.held_lock:
            if self.abandoned or pk not in self.held:
                return False
            self.held.remove(pk)
            return True

    def give_back_unbegun(self) -> None:
        """Give back, in one UPDATE, the claims this sender has not begun, and begin none after; called from
        another thread (the main one, on a second signal).
        """
        with self.held_lock:
            self.abandoned = True
            held, self.held = self.held, []
        if held:
            try:
                Message.objects.filter(pk__in=held, claimed_by=self.token).update(claimed_until=None)
            except Exception:
                logger.debug("giving back %d claims failed; they lapse by themselves", len(held), exc_info=True)
                unfinished.claims_kept(held, self.token)

    def _release_held(self) -> None:
        """Give back at once the claims this pass did not get to (it was asked to stop, or it ended)."""
        if self.held:
            held, self.held = self.held, []
            try:
                Message.objects.filter(pk__in=held, claimed_by=self.token).update(claimed_until=None)
            except Exception:
                logger.debug("releasing %d claims failed; the next pass gives them back", len(held), exc_info=True)
                unfinished.claims_kept(held, self.token)

    def _handle(self, claimed: Claimed) -> Outcome | None:
        """Send the claimed message and record how it went; None if it is gone."""
        pk, message, email = claimed.pk, claimed.message, claimed.email
        sent = False
        try:
            if claimed.load_error is not None:
                _set_aside_unloadable(pk, claimed.load_error)
                return Outcome("deferred")
            if message is None:
                return None
            if claimed.read_error is not None or email is None:
                if _holds_nothing(message):
                    _discard_empty(message)
                    return None  # gone
                _set_aside_unreadable(message, claimed.read_error or UndecodableData("no email"))
                return Outcome("deferred")
            route = routing_alias(message.mailer_alias)
            if route in self.progress.routes_down():
                # Claimed before its mail server was found unreachable: it waits, untouched, for the next pass.
                _release_quietly(pk, self.token)
                return None
            if not self._use_route(route, message):
                return Outcome("deferred")
            try:
                recipients = email.recipients()
                if not recipients:
                    # Queued so by django-mailer 2.x (its don't-send list dropped every recipient, or mail_admins
                    # ran without ADMINS): nothing goes out, and the message is done, as it was there.
                    message.record(RESULT_DONT_SEND, "the message has no recipients: nothing to send")
                    return Outcome("dont_send")
                if claimed.suppressed and claimed.suppressed == recipients:
                    message.record(RESULT_DONT_SEND, _dont_send_reason(claimed.suppressed))
                    return Outcome("dont_send")

                before = _snapshot(email)
                outcome, refused = self._deliver(message, email)
                if outcome is GIVEN_BACK:
                    return None
                if outcome is not None:
                    return outcome
                sent = True
                if _changed_since(email, before):
                    # The backend changed the message (an email service noting its
                    # own id, a header added): log it as the backend left it, as django-mailer did.
                    with contextlib.suppress(UnstorableEmail):  # not plain data: log it as queued
                        message.email = email
                self._sent(message, _refusals_note(message, email, refused))
                return Outcome("sent")
            except (SentButNotRecorded, ImproperlyConfigured):
                raise
            except Exception as exc:
                if sent:
                    mark_sent(message)
                    raise SentButNotRecorded(f"{type(exc).__name__}: {loggable(str(exc), message)}") from exc
                if _database_in_trouble(exc):
                    raise  # not this row: end the pass
                _set_aside(message, exc)
                return Outcome("deferred")
        except BaseException:
            if not sent:
                _release_quietly(pk, self.token)
            raise

    def _sent(self, message: Message, note: str) -> None:
        """Record ``message``, which went out, now or soon: at most ``unrecorded_at_most`` wait at any time."""
        if self.records_aside is None:
            self.records_aside = self.unrecorded_at_most >= 2 and records_aside(message._state.db or "default")
        if self.recorder is None and self.records_aside and len(self.held) >= RECORD_ASIDE_FROM:
            self._record_unrecorded()
            self.recorder = recorder_for(message._state.db or "default")
        if self.recorder is not None:
            self.recorder.record(message, note)  # sent: recorded while the next one goes out
            return
        self.unrecorded.append((message, note))
        if len(self.unrecorded) >= self.unrecorded_at_most:
            self._record_unrecorded()

    def _record_unrecorded(self) -> None:
        """Record the messages sent since the last record, in one transaction; wait for the recorder's."""
        if self.unrecorded:
            sent, self.unrecorded = self.unrecorded, []
            record_sent(sent)
        if self.recorder is not None:
            self.recorder.wait()

    def _deliver(self, message: Message, email: EmailMessage) -> tuple[Outcome | None, dict[str, Any]]:
        """Hand ``email`` to the delivering connection; return None and the refused recipients if it went out.

        Otherwise return the outcome the error handler decided.
        """
        _log_sending(email)
        connecting = not self.connection_open
        try:
            try:
                self._send_over_connection(email)
            except Exception as exc:
                if connecting or not _session_ended(exc):
                    raise
                # The server ended the session the pass was reusing (idle
                # timeout, a per-session limit) before the message's text went out.
                logger.info("the mail server ended the session (%s); opening a new one", loggable(str(exc), message))
                self._drop_connection()
                connecting = True
                self._send_over_connection(email, get_delivery_connection(message, alias=self.route))
        except Exception as exc:
            return self._failed(message, exc, while_connecting=connecting and not self.connection_open), {}
        refused = getattr(self.connection, "refused_recipients", None)
        return None, (refused(email) if callable(refused) else {})

    def _send_over_connection(self, email: EmailMessage, connection: BaseEmailBackend | None = None) -> None:
        """Send ``email`` over the pass's connection (or ``connection``, which becomes the pass's), opened once."""
        if connection is not None:
            self.connection = connection
        if self.connection is None:
            raise RuntimeError("the pass has no delivery connection")
        if not self.connection_open:
            if self.route not in self.sessions:
                self.sessions.add(self.route)
                self.progress.session_opening(self.route)
            self.connection.open()
            self.connection_open = True
        self.connection.send_messages([email])

    def _failed(self, message: Message, exc: Exception, while_connecting: bool) -> Outcome:
        connection, route = self.connection, self.route
        if while_connecting and route in self.sessions:
            self.sessions.discard(route)
            # The server answered, refusing one more session, while others of the pass have theirs (or are
            # getting them): a limit on sessions. A timeout or a refused connection is an outage, whatever the
            # others are doing: a server that hangs keeps them all waiting.
            limited = self.progress.opening_failed(route) and isinstance(exc, smtplib.SMTPResponseException)
            if limited:
                return self._give_back(message, exc, retire=True)
            outage = failures.understand(exc, while_connecting=True).outage
            if outage and not self.progress.first_to_find_down(route):
                return self._give_back(message, exc, retire=False)
        try:
            new_connection, status = self.error_handler(connection, message, exc)
        except Exception as raised:
            # The contract of django-mailer 2.x: a handler raises what it does
            # not know. Raised here, it would stop every later pass on this
            # message: the message is set aside, the pass goes on.
            _set_aside(message, exc, handler_error=raised)
            new_connection, status = None, "deferred"
        # A handler that left the message as it was must not leave it claimed: the next pass tries it again.
        _release_quietly(message.pk, self.token)
        if new_connection is not connection:
            self._drop_connection()
            self.connection = new_connection
        failure = failures.understand(exc, while_connecting=while_connecting)
        if not failure.outage:
            return Outcome(status)
        ends_pass = self.progress.route_down(route)
        if ends_pass:
            consequence = "the pass ends, the other messages wait for the next one"
        else:
            consequence = "the other messages it delivers wait for the next pass, the rest of the queue goes on"
        logger.error(
            "the mail server %s cannot be reached (%s): %s",
            _server_name(connection),
            loggable(failure.reason, message),
            consequence,
        )
        reporting.observer().server_unreachable(_server_name(connection), loggable(failure.reason, message))
        return Outcome(status, ends_pass=ends_pass)

    def _give_back(self, message: Message, exc: Exception, retire: bool) -> Outcome:
        """Give ``message`` back untouched after a session could not be opened for it; with ``retire``, stop
        this sender too (its other claims are given back as it ends).

        The other senders' sessions on the same route show that the mail
        server is there: it limits the sessions of one client (a ``421`` at
        the greeting, as Postfix, Exchange and hosted services answer), and
        the message goes out over one of theirs. Otherwise the route was
        found unreachable meanwhile, and the message waits for the next pass.
        """
        _release_quietly(message.pk, self.token)
        server = _server_name(self.connection)
        self._drop_connection()
        reason = loggable(failures.describe(exc), message)
        if retire:
            self.retired = True
            logger.warning(
                "the mail server %s would not take another session (%s): this delivery connection stops, "
                "the others go on",
                server,
                reason,
            )
        else:  # the outage itself is logged once, at ERROR, by the sender that met it first
            logger.debug("the mail server %s is down (%s): the message waits for the next pass", server, reason)
        return GIVEN_BACK

    def _use_route(self, route: str | None, message: Message) -> bool:
        """Make the connection of ``route``, that of the mailer ``message`` was queued through, the one at hand;
        False if that mailer's delivering connection cannot be made (the message is then set aside, and the
        others go on).

        A message queued through a ``MAILERS`` entry leaves through that
        entry's ``deliver_using`` (``delivery.routing_alias`` says when). The
        default route is checked when the pass starts; a connection of it
        that cannot be made fails every message alike and ends the pass.
        """
        if route != self.route:
            if self.connection is not None:
                if self.connection_open:
                    self.idle[self.route] = self.connection
                else:
                    self._drop_connection()
            self.connection = self.idle.pop(route, None)
            self.connection_open = self.connection is not None
            self.route = route
        if self.connection is None:
            if route is None:
                self.connection = get_delivery_connection(message)
                return True
            try:
                self.connection = get_delivery_connection(message, alias=route)
            except (ImportError, ImproperlyConfigured, TypeError, ValueError) as exc:
                _set_aside(message, exc)
                return False
        return True

    def _drop_connection(self) -> None:
        if self.connection is not None:
            _close_quietly(self.connection)
        self.connection = None
        self.connection_open = False
        if self.route in self.sessions:
            self.sessions.discard(self.route)
            self.progress.session_closed(self.route)

    def _drop_connections(self, keep: bool = False) -> None:
        """Close the connection at hand and those of the other routes the pass used; with ``keep``, leave
        those still open to later passes (``KeptSessions``), if any will take them.
        """
        if keep and self.kept is not None:
            if self.connection is not None and self.connection_open:
                self.idle[self.route] = self.connection
                self.connection = None
            self.idle = {route: kept for route, kept in self.idle.items() if not self.kept.keep(route, kept)}
        self._drop_connection()
        idle, self.idle = self.idle, {}
        for connection in idle.values():
            _close_quietly(connection)
        for route in self.sessions:
            self.progress.session_closed(route)
        self.sessions.clear()


# How long runmailer_pg keeps the SMTP session of a pass open for the next: mail queued soon after another
# then goes out without a new connection, greeting and EHLO, which cost more than the rest of its way.
KEEP_SESSION_SECONDS = 5.0

_KEPT_SESSIONS: contextvars.ContextVar["KeptSessions | None"] = contextvars.ContextVar(
    "mailer_kept_sessions", default=None
)


class KeptSessions:
    """SMTP sessions that passes leave open for the next passes of one loop (``runmailer_pg``), a short while.

    A pass with one delivery connection, run inside ``keeping()``, begins
    with the sessions kept there and leaves its own there when it ends
    well. A session waits ``KEEP_SESSION_SECONDS`` at most. One the server
    ended meanwhile (an idle timeout) is replaced as any reused session is
    (``SendingPass._deliver``): smtplib reports a closed or reset
    connection as ``SMTPServerDisconnected``, before the message's DATA,
    and the message goes out over a new session. The loop closes them
    when it stops, when a pass fails or does not run (paused, the lock held
    elsewhere), and when they have waited too long.
    """

    def __init__(self) -> None:
        self._sessions: dict[str | None, tuple[BaseEmailBackend, float]] = {}

    @contextlib.contextmanager
    def keeping(self) -> Iterator[None]:
        reset = _KEPT_SESSIONS.set(self)
        try:
            yield
        finally:
            _KEPT_SESSIONS.reset(reset)

    def take(self) -> dict[str | None, BaseEmailBackend]:
        """Hand over the sessions kept, by route, and keep none."""
        self.close_stale()
        sessions, self._sessions = self._sessions, {}
        return {route: connection for route, (connection, _since) in sessions.items()}

    def keep(self, route: str | None, connection: BaseEmailBackend) -> bool:
        """Keep ``connection``, the open session of ``route``; False if it is not one to keep (not SMTP)."""
        if not isinstance(getattr(connection, "connection", None), smtplib.SMTP) or route in self._sessions:
            return False
        self._sessions[route] = (connection, time.monotonic())
        return True

    def close_stale(self) -> None:
        """Close the sessions kept ``KEEP_SESSION_SECONDS`` or more."""
        now = time.monotonic()
        for route, (connection, since) in list(self._sessions.items()):
            if now - since >= KEEP_SESSION_SECONDS:
                del self._sessions[route]
                _end_kept(connection)

    def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for connection, _since in sessions.values():
            _end_kept(connection)


# How long QUIT may wait for its reply on a session kept idle: a server that stopped answering meanwhile
# must not hold up the loop, nor its exit on SIGTERM, for the whole EMAIL_TIMEOUT.
KEPT_SESSION_QUIT_SECONDS = 1.0


def _end_kept(connection: BaseEmailBackend) -> None:
    """Close a session kept idle, waiting ``KEPT_SESSION_QUIT_SECONDS`` at most for the reply to QUIT."""
    sock = getattr(getattr(connection, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(KEPT_SESSION_QUIT_SECONDS)
    _close_quietly(connection)


def _close_quietly(connection: BaseEmailBackend) -> None:
    try:
        connection.close()
    except Exception:
        logger.debug("closing the delivery connection failed", exc_info=True)


def _read_one(pk: int) -> Claimed:
    """Read row ``pk`` alone, after reading its group failed: tell a row that cannot be returned from a
    database in trouble (which raises).
    """
    try:
        return Claimed(pk, Message.objects.filter(pk=pk).first())
    except (DatabaseError, ValueError, TypeError) as exc:
        if not _row_unreadable(pk):
            raise  # the database is in trouble, not this row: end the pass
        return Claimed(pk, load_error=exc)


def _read_email(message: Message) -> EmailMessage:
    """Return the email ``message`` holds, with its Message-ID kept on the row.

    Raise if the row cannot be read: the caller sets it aside.
    """
    data = message.message_data
    if len(data) > READ_BYTES:
        # Take the stored text off the instance: a large message is then held
        # once (as the email) while the backend renders it, not twice. Django
        # reloads the field when the log row needs it.
        del message.__dict__["message_data"]
    email = decode(data)
    del data
    if not isinstance(email, EmailMessage):
        raise UndecodableData(f"message data holds a {type(email).__name__}, not an email")
    email.recipients()  # raises unless the fields the engine relies on are usable
    if get_message_id(email) is None:
        # Queued by django-mailer or by assigning Message.email: give it its
        # Message-ID now, and keep it, so every attempt carries the same one.
        ensure_message_id(email)
        message.email = email
        message.save(update_fields=["message_data"])  # and the search columns, from it
        if len(message.message_data) > READ_BYTES:
            del message.__dict__["message_data"]  # held once, as the email
            message.__dict__.pop("_columns_of", None)  # which names the text the search columns came from
    return email


def _snapshot(email: EmailMessage) -> dict[str, Any]:
    """Return the attributes of ``email`` with its dicts and lists copied, to tell whether a backend changes it.

    One level deep: an attribute replaced, and a change in place (a header
    added to ``extra_headers``, a recipient appended), are seen. The copies
    share their items, so a large attachment is neither copied nor compared
    byte by byte.
    """
    return {name: copy.copy(value) if isinstance(value, dict | list) else value for name, value in vars(email).items()}


def _changed_since(email: EmailMessage, snapshot: dict[str, Any]) -> bool:
    try:
        return bool(vars(email) != snapshot)
    except Exception:  # a subclass's attribute that cannot be compared: store it again, to be sure
        return True


def _holds_nothing(message: Message) -> bool:
    """Return whether the row's ``message_data`` is empty (a large one is off the instance, see ``_read_email``)."""
    return "message_data" in message.__dict__ and not message.message_data


def _discard_empty(message: Message) -> None:
    """Delete a row with no message data, with a warning and no log row, as django-mailer did.

    There is nothing in it to send, to keep for a human, or to retry; a row
    that holds data, however damaged, is set aside instead.
    """
    logger.warning(
        "message discarded due to failure in converting from DB: it holds no message data. "
        "Added on '%s' with priority '%s'",
        message.when_added,
        message.priority,
    )
    message.delete()


def _set_aside_unreadable(message: Message, exc: Exception) -> None:
    """Defer a row that cannot be read: it is never lost and never run, and waits for a human."""
    reason = str(exc)
    if not isinstance(exc, UndecodableData):
        reason = f"message data is damaged: {type(exc).__name__}: {exc}"
    logger.warning(
        "message deferred due to failure in converting from DB (%s). Added on '%s' with priority '%s'",
        loggable(reason, message),
        message.when_added,
        message.priority,
    )
    message.defer(reason)


def _database_in_trouble(exc: Exception) -> bool:
    """Return whether ``exc`` says the database cannot be used (gone, locked), rather than that one row is bad."""
    return isinstance(exc, DatabaseError) and not cannot_hold(exc)


def _row_unreadable(pk: int) -> bool:
    """Return whether the database cannot return row ``pk`` as Django reads it (SQLite: text that is not UTF-8,
    a date that is not one).

    Only SQLite stores what it cannot return; on other databases, and when a
    second try reads the row (a lock timed out), the database is in trouble,
    not the row.
    """
    if database_connections[Message.objects.db].vendor != "sqlite":
        return False
    try:
        Message.objects.filter(pk=pk).first()
    except (DatabaseError, ValueError, TypeError):
        # Readable without its columns: the row is what is wrong (this raises if the database is down).
        return bool(Message.objects.filter(pk=pk).values_list("pk", flat=True).exists())
    return False


def _set_aside_unloadable(pk: int, exc: Exception) -> None:
    """Defer a row that cannot be read, with a log row that copies nothing of it (nothing can be read)."""
    detail = str(exc)
    if not keeps_message_data():
        # SQLite quotes the text it could not decode ("... column 'recipients' with text '...'"): an address,
        # a subject.
        detail = detail.split(" with text '", 1)[0]
    reason = storable_text(f"the row cannot be read from the database: {type(exc).__name__}: {detail}") or ""
    logger.warning("message %s deferred: %s", pk, reason)
    with transaction.atomic(using=Message.objects.db):
        Message.objects.filter(pk=pk).update(priority=PRIORITY_DEFERRED, claimed_until=None)
        MessageLog.objects.create(
            when_added=datetime_now(), priority=PRIORITY_DEFERRED, result=RESULT_FAILURE, log_message=reason
        )


def _set_aside(message: Message, exc: BaseException, handler_error: Exception | None = None) -> None:
    """Defer ``message`` after an error nothing else handled, and log why at ERROR."""
    reason = f"{type(exc).__name__}: {exc}"
    if handler_error is not None:
        reason += f" (MAILER_ERROR_HANDLER raised {type(handler_error).__name__}: {handler_error})"
    message.defer(reason)
    logger.error(
        "message deferred after an unexpected error: %s",
        loggable(reason, message),
        exc_info=keeps_message_data(),  # a traceback may quote the message's addresses
    )


def _release_quietly(pk: int, token: str) -> None:
    """Give the claim back at once, rather than when it lapses: the pass is ending."""
    try:
        Message.objects.filter(pk=pk, claimed_by=token).update(claimed_until=None)
    except Exception:
        logger.debug("releasing the claim of message %s failed; the next pass gives it back", pk, exc_info=True)
        unfinished.claims_kept([pk], token)


def _server_name(connection: BaseEmailBackend | None) -> str:
    """Name the mail server a connection talks to, for the log: host:port, and the MAILERS alias if any."""
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    alias = getattr(connection, "alias", None)
    name = f"{host}:{port}" if host is not None else delivery_route().describe()
    return f"{name} (MAILERS[{alias!r}])" if alias and host is not None else name


# The query that picks the next messages of the whole queue, built and compiled once (for each database
# and USE_TZ) with stand-ins for the pass's token and the time: at each claim, building and compiling it
# would cost more than running it (``MessageQuerySet.claim_and_read``).
_WHOLE_QUEUE: dict[tuple[str, bool], tuple[Any, tuple[str, datetime.datetime, datetime.datetime]]] = {}


def _whole_queue() -> tuple[Any, tuple[str, datetime.datetime, datetime.datetime]]:
    """The due, claimable messages of the whole queue not tried by the pass yet, in sending order, with the
    stand-ins for the pass's token and for the time in the two filters that take it.
    """
    using = router.db_for_write(Message)
    key = (using, bool(settings.USE_TZ))
    if key not in _WHOLE_QUEUE:
        zone = datetime.timezone.utc if settings.USE_TZ else None
        # No token is this (tokens are hex digits, a pid, "@" and a hash), and no due date these.
        stand_ins = (
            "mailer: the token of a pass",
            datetime.datetime(1901, 1, 1, 0, 0, 0, 1, tzinfo=zone),
            datetime.datetime(1901, 1, 1, 0, 0, 0, 2, tzinfo=zone),
        )
        token, due, claimable = stand_ins
        queryset = prioritize(Message.objects.using(using).non_deferred()).exclude(claimed_by=token)
        _WHOLE_QUEUE[key] = (queryset.due(due).claimable(claimable), stand_ins)
    return _WHOLE_QUEUE[key]


def _session_ended(exc: Exception) -> bool:
    """Return whether ``exc`` says the server closed the session, rather than refused the message."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # Not a timeout (smtplib reports one so too), nor a session lost once the message's text was going
        # out: the server may have taken the message before it stopped answering, and sending it again at
        # once could deliver it twice.
        return not isinstance(exc.__context__, TimeoutError) and not _text_went_out(exc)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return any(code == 421 for code, _reply in exc.recipients.values())
    return isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 421


def _text_went_out(exc: BaseException) -> bool:
    """Whether ``exc`` was raised once smtplib was giving the server the message's text: inside its ``data()``,
    after the server's ``354`` (where ``data()`` has made ``q``, the text to send).
    """
    traceback = exc.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is smtplib.SMTP.data.__code__:
            return "q" in traceback.tb_frame.f_locals
        traceback = traceback.tb_next
    return False


def _refusals_note(message: Message, email: EmailMessage, refused: dict[str, Any]) -> str:
    """Say which recipients the server refused while it accepted the others, for the log row of ``message``.

    Those refused for now (4xx) get a copy of their own, queued as after any
    temporary failure: otherwise they would never get the message.
    """
    if not refused:
        return ""
    note = "sent; recipients refused: " + failures.describe_refusals(refused)
    for_now = [recipient for recipient, (code, _reply) in refused.items() if not failures.is_permanent(code)]
    if not for_now:
        return note
    try:
        reason = "recipients refused: " + failures.describe_refusals({r: refused[r] for r in for_now})
        retry = _queue_copy_for(message, email, for_now, reason)
    except Exception as exc:
        logger.error("the recipients refused for now could not be queued again: %s", loggable(str(exc), message))
        return f"{note}; those refused for now could not be queued again: {type(exc).__name__}: {exc}"
    return f"{note}; those refused for now are queued again as message {retry.pk}"


def _queue_copy_for(message: Message, email: EmailMessage, recipients: list[str], reason: str) -> Message:
    """Queue a copy of ``email`` for ``recipients`` only, each in its field (to, cc, bcc), as a temporary failure."""
    retry = copy.copy(email)
    retry.to = [recipient for recipient in email.to if recipient in recipients]
    retry.cc = [recipient for recipient in email.cc if recipient in recipients]
    retry.bcc = [recipient for recipient in email.bcc if recipient in recipients]
    copy_message = Message.for_email(retry, priority=message.priority)
    copy_message.retry_count = message.retry_count
    copy_message.save()
    retry_at = _automatic_retry_time(copy_message)
    if retry_at is None:
        copy_message.defer(reason)
    else:
        copy_message.retry_later(reason, retry_at)
    return copy_message


def _record_earlier_sends(token: str) -> None:
    """Record the messages an earlier pass sent but could not record (``mark_sent``), before sending any other.

    While the database cannot record them, no pass sends anything: the
    error ends the pass here, so mail is not sent that cannot be recorded.
    """
    for message in Message.objects.sent_but_not_recorded():
        if not Message.objects.take_for_recording(message, token):
            continue  # another worker is recording it
        logger.warning("recording message %s, sent by an earlier pass", message.message_id or message.pk)
        try:
            message.record(RESULT_SUCCESS, "sent by an earlier pass, recorded late")
        except Exception as exc:
            if _database_in_trouble(exc):
                raise  # the database cannot record: send nothing
            # Something about this row alone: it stays marked (never sent again) and stops nothing.
            logger.error("message %s, sent earlier, cannot be recorded: %s", message.pk, loggable(str(exc), message))


def _dont_send_reason(suppressed: list[str]) -> str:
    if not keeps_message_data():
        return "all recipients are on the don't send list"
    return "all recipients are on the don't send list: " + ", ".join(suppressed)


def _log_sending(email: Any) -> None:
    if keeps_message_data():
        logger.info("sending message '%s' to %s", email.subject, ", ".join(map(str, email.to)))
    else:
        logger.info("sending message %s", email.extra_headers.get("Message-ID", ""))


def _asked_to_stop() -> bool:
    if stopping.stop_requested():
        logger.info("asked to stop: ending the pass")
        return True
    return False
