"""Recording sent messages: a log row each, and off the queue.

A message that went out but is not recorded would be sent again by a later
pass, so recording tries hard (``record_sent``), and what it cannot record
it marks as sent (``mark_sent``). On a database server a record is mostly
waiting, for the server to write it to disk: ``recorder_for`` gives a pass
a recorder that does that waiting while the pass sends the next message.
"""

import contextlib
import logging
import math
import selectors
import threading
import time
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import DatabaseError, connections

from mailer import unfinished
from mailer.exceptions import SentButNotRecorded
from mailer.models import RESULT_SUCCESS, Message, row_signals_heard
from mailer.redaction import loggable

try:
    import psycopg

    PSYCOPG_ERRORS: tuple[type[Exception], ...] = (psycopg.Error,)
except ImportError:  # without psycopg 3 there is no OverlappingRecorder
    PSYCOPG_ERRORS = ()

# What a failing connection of an OverlappingRecorder raises: psycopg's own errors too, as libpq is called directly.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (DatabaseError, OSError, *PSYCOPG_ERRORS)
# And what writing out one message's record can raise, for its data, or as its row is gone (a large
# message's data is read again): the ORM's way tells more, and copes.
DATA_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, ValueError, TypeError, ObjectDoesNotExist)

# Part of the engine's work, and logged as such: sites and the docs know the engine's logger.
logger = logging.getLogger("mailer.engine")

RECORD_ATTEMPTS = 3

# Sent messages are recorded in one statement only while their data together stays within this: the log
# rows copy it, and MariaDB refuses a statement longer than its max_allowed_packet (16 MB by default, 1 MB
# before MariaDB 10.2).
TOGETHER_BYTES = 1024 * 1024

# The databases whose commits are worth waiting for on another connection: servers, whose commit waits for a
# disk. SQLite's commit in WAL mode costs a fraction of a millisecond, and a second writer would only
# wait for the first.
RECORDED_ASIDE_ON = ("postgresql", "mysql")

# A pass records aside once it holds this many claimed messages still to send: enough to repay the
# recorder's own database connection, which a pass sending a message or two (runmailer_pg) does without.
RECORD_ASIDE_FROM = 10


def record_sent(sent: list[tuple[Message, str]], *, again: bool = False) -> None:
    """Record delivered messages (each with the note for its log row), together, trying again briefly.

    ``again``: a record of them may have been committed already, its reply lost
    (``Message.record_together``). So may the one before each try here.

    A failure here risks sending them twice: if it still fails, each is
    marked as sent (``mark_sent``), so that no pass sends it again, and
    ``SentButNotRecorded`` is raised.
    """
    sent = list(sent)  # what is recorded is taken off it: only the rest is tried again, or marked
    for attempt in range(1, RECORD_ATTEMPTS + 1):
        try:
            if len(sent) > 1 and _held_bytes(sent) <= TOGETHER_BYTES:
                Message.record_together(sent, RESULT_SUCCESS, again=again or attempt > 1)
                return
            # One by one: large messages together could exceed what one statement may carry (MariaDB's
            # max_allowed_packet).
            while sent:
                message, note = sent[0]
                Message.record_together([(message, note)], RESULT_SUCCESS, again=again or attempt > 1)
                sent.pop(0)
            return
        except DatabaseError as exc:
            if attempt == RECORD_ATTEMPTS:
                for message, _note in sent:
                    logger.error(
                        "message %s was sent but could not be recorded (%s)", message.message_id or message.pk, exc
                    )
                    mark_sent(message)
                raise SentButNotRecorded(str(exc)) from exc
            time.sleep(0.5 * attempt)
            # The database may have restarted: try again over a new connection.
            drop_if_broken(connections[sent[0][0]._state.db or "default"])
        except Exception as exc:
            for message, _note in sent:
                mark_sent(message)
            raise SentButNotRecorded(f"{type(exc).__name__}: {loggable(str(exc), sent[0][0])}") from exc


def _held_bytes(sent: list[tuple[Message, str]]) -> float:
    """The size of the data of the ``sent`` messages; infinite if one no longer holds its data (as the engine
    lets go of a large message's): reading it again would cost a query, and its row may be gone.
    """
    if any("message_data" in message.get_deferred_fields() for message, _note in sent):
        return math.inf
    return sum(len(message.message_data or "") for message, _note in sent)


def drop_if_broken(connection: Any) -> None:
    """Let Django replace ``connection`` if it broke (a database restart) or grew too old; one inside a
    transaction (a test, a caller's atomic block) is left alone."""
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


def discard(connection: Any) -> None:
    """Close ``connection`` for good, so that Django opens a new one when it is next used; one inside a
    transaction is left alone.

    With Django's connection pool (PostgreSQL), closing hands the connection
    back to the pool, with whatever an error left on it (a prepared
    statement a migration made stale); the driver's connection is closed
    first, so that the pool throws it away. A connection that fails to
    close is dropped all the same.
    """
    if connection.in_atomic_block:
        return
    with contextlib.suppress(Exception):
        if getattr(connection, "pool", None) is not None and connection.connection is not None:
            connection.connection.close()
    with contextlib.suppress(Exception):
        connection.close()


def mark_sent(message: Message) -> None:
    """Mark a message that went out but could not be recorded, so that no pass sends it again.

    A small UPDATE in place often succeeds where the log row and the
    deletion did not (a full disk). The next pass records the message
    before it sends anything. If even this fails, the claim keeps the
    message from being sent again until ``MAILER_CLAIM_TIMEOUT`` has passed.
    """
    try:
        marked = Message.objects.mark_sent(message.pk, message.claimed_by or "")
    except Exception:
        logger.error("message %s stays claimed until %s", message.message_id or message.pk, message.claimed_until)
        unfinished.sent_unmarked(message.pk, message.claimed_by or "")  # for this process's next pass to mark
        return
    if marked:
        logger.error("message %s is marked as sent; a later pass will record it", message.message_id or message.pk)


def recorder_for(using: str) -> "Recorder | OverlappingRecorder":
    """A recorder for what a pass on the database ``using`` sends (``records_aside`` said it records aside).

    Where the site listens to the signals of the rows a record writes, the
    ORM records (on ``Recorder``'s thread), so that its receivers run.
    """
    if connections[using].vendor == "postgresql" and _psycopg3() and not row_signals_heard():
        return OverlappingRecorder(using)
    return Recorder()


def _psycopg3() -> bool:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


def records_aside(using: str) -> bool:
    """Whether a pass on the database ``using`` records what it sent on a connection of its own (``recorder_for``).

    Only on a database server, and not inside a transaction: the
    recorder's connection would not see what the transaction holds.
    """
    connection = connections[using]
    return connection.vendor in RECORDED_ASIDE_ON and not connection.in_atomic_block


class Recorder:
    """Records sent messages, one at a time, on a thread (and database connection) of its own.

    The commit of a record on a database server is mostly waiting for the
    server's disk: here it overlaps the sending of the next message rather
    than adding to it. One at a time, and ``record`` first waits for the
    record before, so that at most two messages are ever sent but not
    recorded: the one being recorded, and the one just sent. An error of a
    record is raised in the pass, by the next ``record``, ``wait`` or
    ``close``.
    """

    def __init__(self) -> None:
        self._sent: list[tuple[Message, str]] | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="mailer-recorder", daemon=True)
        self._thread.start()

    def record(self, message: Message, note: str) -> None:
        """Have ``message``, just sent, recorded with ``note``, once the record before is done.

        If that one failed, its error is raised here, and ``message`` is
        marked as sent (as its own record would likely fail too).
        """
        try:
            self.wait()
        except BaseException:
            mark_sent(message)
            raise
        with self._changed:
            self._sent = [(message, note)]
            self._changed.notify_all()

    def pending(self) -> list[Message]:
        """The message handed over and not recorded yet, if any: its claim must be kept like the others'."""
        with self._changed:
            return [message for message, _note in self._sent or []]

    def wait(self) -> None:
        """Wait until the message handed over last is recorded; raise the error of its record, if any."""
        with self._changed:
            self._changed.wait_for(lambda: self._sent is None)
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the last record, then end the thread, which closes its database connections."""
        try:
            self.wait()
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
        self._thread.join()  # only once the wait is over: the thread is idle, and ends at once

    def _work(self) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._sent is not None or self._closing)
                    sent = self._sent
                if sent is None:
                    return
                error = None
                try:
                    record_sent(sent)
                except BaseException as exc:  # raised in the pass, which decides
                    error = exc
                with self._changed:
                    self._sent, self._error = None, error
                    self._changed.notify_all()
        finally:
            connections.close_all()


class OverlappingRecorder:
    """Records sent messages, one at a time, on a PostgreSQL connection of its own (psycopg 3), without a thread.

    Each record is one statement (``Message.recording_statement``), handed
    to the server and left to run: its commit overlaps the sending of the
    next message, and its result is collected before the next record is
    handed over, so that at most two messages are ever sent but not
    recorded. ``Recorder``'s thread would do the same waiting, but handing
    each message to a thread costs the pass more time than the record does.

    The statements go to the server through libpq itself (psycopg's
    ``pgconn``), written out as Django's cursor would write them: the
    connection's execute wrappers and the ``DEBUG`` query log do not see
    them. If anything goes wrong on this connection, the record is made
    again on the pass's own connection (``record_sent``, which tries hard),
    and so are the pass's later records. Made again, it logs only a message
    it takes off the queue: the first one may have been committed.
    """

    def __init__(self, using: str) -> None:
        from psycopg import ClientCursor

        # The message handed over last, its note, and whether its log row is copied from its queue row.
        self._sent: tuple[Message, str, bool] | None = None
        self._database: Any = connections.create_connection(using)
        try:
            self._database.ensure_connection()
            if not self._database.get_autocommit():
                raise DatabaseError("the connection does not commit each statement (the AUTOCOMMIT setting)")
        except Exception as exc:
            self._give_up(exc)
            return
        except BaseException:
            self._close()
            raise
        # Writes the statements out, parameters included, as Django's cursor does (client-side binding).
        self._writer = ClientCursor(self._database.connection)

    def record(self, message: Message, note: str) -> None:
        """Have ``message``, just sent, recorded with ``note``, once the record before is done.

        If that one could not be recorded at all, its error is raised here,
        and ``message`` is marked as sent (as its own record would likely
        fail too).
        """
        try:
            self.wait()
        except BaseException:
            mark_sent(message)
            raise
        statement = None
        if self._database is not None:
            try:
                statement = message.recording_statement(RESULT_SUCCESS, note, self._database)
                query = self._writer.mogrify(statement.sql, statement.params) if statement is not None else ""
            except DATA_ERRORS as exc:
                logger.warning("message %s is recorded on the sending connection: %s", message.pk, exc)
                statement = None
        if statement is None:  # the ORM must make it (signals), or it could not be written out
            record_sent([(message, note)])
            return
        try:
            self._send(query.encode(self._database.connection.info.encoding))
        except CONNECTION_ERRORS as exc:
            self._give_up(exc)
            record_sent([(message, note)], again=True)  # it may have gone out whole
            return
        self._sent = (message, note, statement.from_queue_row)

    def pending(self) -> list[Message]:
        """The message handed over and not recorded yet, if any: its claim must be kept like the others'."""
        return [self._sent[0]] if self._sent is not None else []

    def wait(self) -> None:
        """Wait until the message handed over last is recorded. If its record failed, make it on the pass's
        connection; if that fails too, it is marked as sent and ``SentButNotRecorded`` raised.
        """
        if self._sent is None:
            return
        message, note, from_queue_row = self._sent
        try:
            taken = self._collect()
        except CONNECTION_ERRORS as exc:
            self._sent = None
            self._give_up(exc)
            record_sent([(message, note)], again=True)
            return
        self._sent = None
        if from_queue_row and not taken:
            # Its queue row was gone (deleted while it was being sent), and the log row with it: it went
            # out all the same, so it is logged from what the pass holds.
            record_sent([(message, note)])

    def close(self) -> None:
        """Wait for the last record, then close the connection."""
        try:
            self.wait()
        finally:
            self._close()

    def _send(self, query: bytes) -> None:
        """Hand ``query`` to the server, all of it: a large message's record outgrows the socket's buffers."""
        pgconn = self._database.connection.pgconn
        pgconn.send_query(query)
        while pgconn.flush():  # psycopg's connections do not block: the rest waits for the socket
            if self._wait_for(selectors.EVENT_READ | selectors.EVENT_WRITE) & selectors.EVENT_READ:
                pgconn.consume_input()

    def _collect(self) -> int | None:
        """Wait for the result of the statement handed over last; return the number it returned, if any
        (a copying record's: how many queue rows it took).

        Raise ``DatabaseError`` if it failed.
        """
        from psycopg.pq import ExecStatus

        pgconn = self._database.connection.pgconn
        pgconn.consume_input()
        while pgconn.is_busy():
            self._wait_for(selectors.EVENT_READ)
            pgconn.consume_input()
        errors, returned = [], None
        while (result := pgconn.get_result()) is not None:
            if result.status == ExecStatus.TUPLES_OK:
                returned = int(result.get_value(0, 0) or 0)
            elif result.status != ExecStatus.COMMAND_OK:
                errors.append((result.error_message or pgconn.error_message).decode(errors="replace").strip())
        if errors:
            raise DatabaseError("; ".join(errors))
        return returned

    def _wait_for(self, events: int) -> int:
        """Wait until the connection's socket is ready for ``events``; return those it is ready for."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._database.connection.pgconn.socket, events)
            return sum(ready for _key, ready in selector.select())

    def _give_up(self, exc: BaseException) -> None:
        """Make this pass's records on its own connection from now on."""
        logger.warning("recording on the sending connection from now on: %s", exc)
        self._close()

    def _close(self) -> None:
        if self._database is not None:
            # A broken connection is let go all the same: Django forgets it, whatever closing it raised.
            with contextlib.suppress(*CONNECTION_ERRORS):
                self._database.close()
        self._database = None
