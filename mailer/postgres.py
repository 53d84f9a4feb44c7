"""Send mail the moment it is queued, on PostgreSQL: the loop behind ``runmailer_pg``.

A trigger on the message table, installed when the loop starts, sends a
``NOTIFY`` on the channel ``django_mailer_new_message`` for each message
inserted. The loop ``LISTEN``s on a database connection of its own and looks
at the queue as soon as a notification comes: a pass (``engine.send_all``,
under the lock file, honouring ``MAILER_PAUSE_SEND``) whenever a message is
due. Notifications that come while a pass runs lead to one more look, not one
per notification.

It also looks every ``MAILER_EMPTY_QUEUE_SLEEP`` seconds, for what no
notification announces: messages put back by ``retry_deferred``, automatic
retries whose time has come, claims that lapsed, mail queued while it was
not listening. A pass that fails is logged and the loop goes on; a lost
listening connection (a database restart) is opened again, ``LISTEN`` and
the trigger with it, followed by a look for what was missed. A stop request
(``mailer.stopping``: SIGTERM, SIGINT, SIGHUP) is seen within
``STOP_CHECK_INTERVAL`` seconds while it waits.

Works with psycopg 3 (3.2 or newer) and psycopg2, whichever Django uses.
"""

import inspect
import logging
import math
import selectors
import time
from typing import Any

from django.db import connections as db_connections
from django.db import transaction

from mailer import conf, engine, recording, stopping, unfinished
from mailer.exceptions import ConfigurationError
from mailer.models import Message, datetime_now

__all__ = ["CHANNEL", "check_database", "install_trigger", "postgres_send_loop"]

logger = logging.getLogger(__name__)

CHANNEL = "django_mailer_new_message"
# The names django-mailer 2.3 gives them, and the same trigger: a site that
# ran its runmailer_pg keeps one trigger, and can go back to it.
TRIGGER = "django_mailer_message_notify_trigger"
TRIGGER_FUNCTION = "django_mailer_notify_new_message"

# How often waiting for a notification looks whether it has been asked to stop.
STOP_CHECK_INTERVAL = 0.2

# How long installing the trigger may wait for the table lock it needs
# (CREATE TRIGGER waits for transactions writing to the table, and inserts
# wait behind it): a busy site is held up this long at most, and the loop
# tries again later.
TRIGGER_LOCK_TIMEOUT = "2s"

# After losing the listening connection: the first attempt to listen again at
# once, then after these many seconds, doubling up to the maximum.
RELISTEN_FIRST_DELAY = 0.5
RELISTEN_MAX_DELAY = 30.0

# The listening connection, unless the site's OPTIONS say otherwise: give up
# connecting after 10 s, and have the system probe it while it is idle, so a
# silently dead connection (a firewall, a NAT dropping idle flows) is noticed
# within about a minute and a half.
LISTENER_DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 60,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

# How long to wait before looking again after a pass failed, when
# MAILER_EMPTY_QUEUE_SLEEP is None (no regular looks).
RETRY_WITHOUT_SLEEP = 30.0

# Notifications that came in several packets while a pass ran are read in up
# to this many reads before the next look, rather than one look per read.
DRAIN_READS = 100


def postgres_send_loop(connections: int | None = None) -> None:
    """Send queued mail until asked to stop, woken by PostgreSQL as soon as a message is queued.

    ``connections``: how many delivery connections each pass uses
    (``engine.send_all(connections=...)``); None leaves it to the engine.
    Raise ``ConfigurationError`` at once if the queue is not on PostgreSQL.
    """
    check_database()
    SendLoop(connections).run()


def check_database() -> None:
    """Raise ``ConfigurationError`` unless the queue's database is PostgreSQL, with a driver that can wait."""
    connection = db_connections[Message.objects.db]
    if connection.vendor != "postgresql":
        raise ConfigurationError(
            f"runmailer_pg needs PostgreSQL (it uses LISTEN/NOTIFY), and the mail queue is on "
            f"{connection.display_name}. Use runmailer instead."
        )
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if is_psycopg3:
        import psycopg

        if "timeout" not in inspect.signature(psycopg.Connection.notifies).parameters:
            raise ConfigurationError(
                f"runmailer_pg needs psycopg 3.2 or newer (or psycopg2); psycopg {psycopg.__version__} is installed."
            )


def install_trigger(cursor: Any, connection: Any) -> bool:
    """Install the trigger that NOTIFYs ``CHANNEL`` on each insert into the message table, unless it is there.

    ``cursor`` is a cursor of ``connection``, a Django PostgreSQL connection,
    inside a transaction. Return whether it was installed. Several processes
    starting at once install it once. The trigger is looked for first, so a
    process that starts takes no lock on the table (and needs no right to
    create it) when it is there already.
    """
    table = connection.ops.quote_name(Message._meta.db_table)
    # One installer at a time, on any host; the lock ends with the transaction.
    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [CHANNEL])
    cursor.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s", [table, TRIGGER])
    if cursor.fetchone() is not None:
        return False
    cursor.execute(f"SET LOCAL lock_timeout = '{TRIGGER_LOCK_TIMEOUT}'")
    new_id = connection.ops.quote_name(Message._meta.pk.column)
    cursor.execute(
        f"CREATE OR REPLACE FUNCTION {TRIGGER_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n    PERFORM pg_notify('{CHANNEL}', NEW.{new_id}::text);\n    RETURN NEW;\nEND\n$$"
    )
    cursor.execute(
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {TRIGGER_FUNCTION}()"
    )
    return True


def ensure_trigger(using: str) -> None:
    """Install the trigger on the database ``using`` if it is missing (a new site, a restored dump)."""
    connection = db_connections[using]
    with transaction.atomic(using=using), connection.cursor() as cursor:
        installed = install_trigger(cursor, connection)
    if installed:
        logger.info("installed the trigger %s on %s, which notifies %s", TRIGGER, Message._meta.db_table, CHANNEL)


class Listener:
    """A database connection of its own, in autocommit, that LISTENs on ``CHANNEL``.

    Made with the site's own connection settings, outside Django's
    connection handling (and any pool), since it must stay open, idle,
    between passes.
    """

    def __init__(self, using: str) -> None:
        wrapper: Any = db_connections[using]  # a PostgreSQL DatabaseWrapper, with its driver as .Database
        params = {**LISTENER_DEFAULTS, **wrapper.get_connection_params()}
        self.connection = wrapper.Database.connect(**params)
        try:
            self.connection.autocommit = True
            with self.connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            self.close()
            raise

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for notifications; return how many came (0: none).

        Every notification already received is taken, so a burst counts once.
        Raise the driver's error if the connection is lost.
        """
        raise NotImplementedError

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            logger.debug("closing the listening connection failed", exc_info=True)


class Psycopg3Listener(Listener):
    def wait(self, timeout: float) -> int:
        received = len(list(self.connection.notifies(timeout=timeout, stop_after=1)))
        if received:
            for _ in range(DRAIN_READS):
                more = len(list(self.connection.notifies(timeout=0)))  # what has come already, if anything
                if not more:
                    break
                received += more
        return received


class Psycopg2Listener(Listener):
    def __init__(self, using: str) -> None:
        super().__init__(using)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.connection, selectors.EVENT_READ)

    def wait(self, timeout: float) -> int:
        # LISTEN may have brought some already.
        if not self.connection.notifies and self.selector.select(timeout):
            self.connection.poll()  # reads what came; raises if the connection is lost
        for _ in range(DRAIN_READS):
            if not self.selector.select(0):
                break
            self.connection.poll()
        received = len(self.connection.notifies)
        self.connection.notifies.clear()
        return received

    def close(self) -> None:
        selector = getattr(self, "selector", None)  # None if LISTEN failed
        if selector is not None:
            selector.close()
        super().close()


def open_listener(using: str) -> Listener:
    """Connect and LISTEN with the driver Django uses for PostgreSQL."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return Psycopg3Listener(using) if is_psycopg3 else Psycopg2Listener(using)


class SendLoop:
    """``runmailer_pg``'s loop: the listening connection, and when to look at the queue next.

    One thread does everything, so a pass never runs twice at once and the
    signals reach it: it waits on the listening connection in short steps
    (seeing a stop request within one), and looks at the queue when a
    notification came, when ``MAILER_EMPTY_QUEUE_SLEEP`` has passed since
    the last look, and after it starts listening (again).
    """

    def __init__(self, connections: int | None = None) -> None:
        # Only when given: an engine without the option still works.
        self.pass_options: dict[str, Any] = {} if connections is None else {"connections": connections}
        self.using = Message.objects.db
        self.listener: Listener | None = None
        self.listen_at = 0.0  # when to try to listen (again)
        self.relisten_delay = RELISTEN_FIRST_DELAY
        self.listen_failures = 0
        self.listened = False  # whether it has listened before: then a lost connection brought it here
        self.look_at = 0.0  # when to look at the queue next
        self.notified_look_at = 0.0  # the soonest a notification may bring that forward
        self.notified = False  # whether notifications came since the last look
        # The SMTP sessions passes leave open for the next, a few seconds (engine.KEEP_SESSION_SECONDS).
        self.sessions = engine.KeptSessions()

    def run(self) -> None:
        try:
            while not stopping.stop_requested():
                if self.listener is None and time.monotonic() >= self.listen_at:
                    self._listen()
                if time.monotonic() >= self.look_at:
                    self._look(notified=self.notified)
                    self.notified = False
                else:
                    self._wait()
                    self.sessions.close_stale()
        finally:
            self.sessions.close()
            self._stop_listening()

    # Looking at the queue ---------------------------------------------------------------------------

    def _look(self, notified: bool = False) -> None:
        """A pass if a message is due; then look again at once if it sent mail (there may be more), else wait.

        ``notified``: a message was just queued, so the pass goes ahead without
        asking first whether one is due, a query less before it goes out.
        """
        now = time.monotonic()
        try:
            _drop_broken_database_connections()
            if notified or unfinished.pending() or Message.objects.non_deferred().due(datetime_now()).exists():
                with self.sessions.keeping():
                    counts = engine.send_all(**self.pass_options)
                if counts is None:  # paused, or the lock is held elsewhere: not for a while, perhaps
                    self.sessions.close()
                if counts and counts["sent"]:
                    self.look_at = self.notified_look_at = now
                    return
        except Exception:
            self.sessions.close()
            # The next pass on new connections: see engine._drop_broken_database_connections.
            _drop_broken_database_connections(suspect=True)
            retry_in = _beat_interval() or RETRY_WITHOUT_SLEEP
            logger.error("the sending pass failed; trying again in %s seconds", retry_in, exc_info=True)
            # Mail queued meanwhile waits for that too, rather than failing again at once, and again.
            self.look_at = self.notified_look_at = now + retry_in
            return
        self.look_at = _next_beat()
        self.notified_look_at = now
        logger.debug("waiting for new mail, or %s seconds, before checking queue again", _beat_interval())

    def _wait(self) -> None:
        """Wait for a notification, at most until the next look, the next attempt to listen, or a step."""
        now = time.monotonic()
        timeout = min(STOP_CHECK_INTERVAL, self.look_at - now)
        if self.listener is None:
            time.sleep(max(0.0, min(timeout, self.listen_at - now)))
            return
        try:
            received = self.listener.wait(max(0.0, timeout))
        except Exception as exc:
            logger.warning("lost the connection listening for new mail (%s); listening again", _one_line(exc))
            self._stop_listening()
            self.listen_at = time.monotonic()
            return
        if received:
            logger.debug("%d notification(s) of new mail", received)
            self.notified = True
            self.look_at = min(self.look_at, self.notified_look_at)

    # Listening --------------------------------------------------------------------------------------

    def _listen(self) -> None:
        """Connect, LISTEN and make sure the trigger is there; on success, look at once for what was missed."""
        # After a lost connection the server may have restarted: the connection
        # passes use is likely dead too, and installing the trigger uses it.
        try:
            _drop_broken_database_connections(suspect=self.listened or self.listen_failures > 0)
            listener = open_listener(self.using)
            try:
                ensure_trigger(self.using)
            except BaseException:
                listener.close()
                raise
        except Exception as exc:
            self.listen_failures += 1
            logger.error(
                "cannot listen for new mail (%s); trying again in %s seconds, and looking at the queue every %s "
                "seconds meanwhile",
                _one_line(exc),
                self.relisten_delay,
                _beat_interval(),
                exc_info=self.listen_failures == 1,  # the traceback once, not at every attempt
            )
            self.listen_at = time.monotonic() + self.relisten_delay
            self.relisten_delay = min(self.relisten_delay * 2, RELISTEN_MAX_DELAY)
            return
        self.listener = listener
        self.listened = True
        self.listen_failures = 0
        self.relisten_delay = RELISTEN_FIRST_DELAY
        self.look_at = self.notified_look_at = min(self.look_at, time.monotonic())
        logger.info("listening for new mail on the channel %s", CHANNEL)

    def _stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _beat_interval() -> float | None:
    """``MAILER_EMPTY_QUEUE_SLEEP``: how often to look at the queue when no notification comes.

    None, as in django-mailer 2.3, means only when notified.
    """
    sleep: float | None = conf.get_setting("MAILER_EMPTY_QUEUE_SLEEP")
    return sleep


def _next_beat() -> float:
    sleep = _beat_interval()
    return math.inf if sleep is None else time.monotonic() + sleep


def _drop_broken_database_connections(suspect: bool = False) -> None:
    """Replace Django's database connections that broke (errors seen on it), or all of them when ``suspect``.

    ``suspect`` means the server was lost (a restart, a failover, an
    administrator ending connections), or a pass failed (see
    ``engine._drop_broken_database_connections``). Each connection is then
    replaced rather than tested: a test query can still succeed on a
    connection the server is about to end, and the query after it fails.

    Unlike ``runmailer``, a healthy connection is kept between looks even
    with ``CONN_MAX_AGE = 0`` (Django's default): opening one for each
    message queued would cost more than the rest of the pass. A positive
    ``CONN_MAX_AGE`` still ends it when it is that old. A connection inside
    a transaction (a test, a caller's atomic block) is left alone.
    """
    for connection in db_connections.all(initialized_only=True):
        if connection.in_atomic_block or connection.connection is None:
            continue
        if suspect:
            recording.discard(connection)
            continue
        if connection.errors_occurred:
            connection.errors_occurred = False
            if not connection.is_usable():
                connection.close()
                continue
        max_age = connection.settings_dict.get("CONN_MAX_AGE")
        if max_age and connection.close_at is not None and time.monotonic() >= connection.close_at:
            connection.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
