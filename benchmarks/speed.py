"""Benchmark: how fast mailer queues and sends, next to the baselines it must keep up with.

Issue 9 asks that a drop-in replacement be no slower than what it replaces,
and as close as it can be to what no queue can beat. This script measures,
in one run, mailer from this checkout and its baselines side by side, and
prints a table of figures, ratios, the goals and PASS or FAIL:

1. ``drain``: send N queued messages (5,000) with ``manage.py send_mail``;
   the limit is Django's own SMTP backend sending the same messages over one
   connection, without a queue (goal: ours >= 0.8x). Raw ``smtplib`` with
   pre-rendered bytes (the physical floor), django-mailer 2.3.2 and
   django-post-office (for reference) are reported. SQLite and PostgreSQL.
2. ``queue``: ``mailer.send_mail()`` one message at a time, against a bare
   ``Message.objects.create()`` loop into a table shaped like
   django-mailer's (goal >= 0.8x); and 2.3.2's.
3. ``bulk``: ``DbBackend.send_messages()`` of 3,000 emails at once, against
   2.3.2's ``DbBackend`` (goal >= 1.0x).
4. ``scale``: drain 3,000 and 30,000: time per message within 1.2x, and the
   draining process's RSS growth <= 30 MB at 30,000 (``--huge``: also
   100,000 on PostgreSQL).
5. ``parallel``: a sink that takes 20 ms per message (``--delay``); 4 ``send_mail``
   processes (``MAILER_USE_FILE_LOCK = False``) against one (goal >= 3.6x),
   and one process with 8 delivery connections against one (goal >= 6x),
   each exactly once. PostgreSQL and MariaDB. The limits are Django's SMTP
   backend sending the same messages without a queue from 4 processes, and
   over 8 connections (threads) of one process, each against itself over
   one connection; and, to tell what holds the threads back, the same from
   8 processes.
6. ``latency``: ``runmailer_pg``, from the commit of a queued message to its
   arrival at the sink, p50 and p99 over 500 messages, against 2.3.2's
   ``runmailer_pg`` (goal: no worse).

Run it by hand from the repository root (never from the test suite)::

    python benchmarks/speed.py --quick              # every figure, small sizes, a couple of minutes
    python benchmarks/speed.py --only drain,queue,bulk --db sqlite,postgresql
    python benchmarks/speed.py --only parallel --db postgresql,mysql
    python benchmarks/speed.py --only scale --huge  # + 100,000 on PostgreSQL

How it measures, and why:

- Every implementation runs in processes of its own (``python speed.py
  --child TASK``, configured by a settings module generated in a temporary
  directory), so they share no memory or imports. Ours runs from this
  checkout with the interpreter that runs the script; django-mailer 2.3.2
  and django-post-office run in throwaway virtualenvs installed from PyPI,
  cached under ``~/.cache/mailer-bench`` (``--cache``), with the same
  Django version as this interpreter when it installs there (else Django
  5.2, and the footer says so). The children run a copy of this script, so
  editing it during a long run changes nothing in that run.
- Timings are taken inside those processes, after Django is set up and the
  database connected, so interpreter start-up is not counted on either side.
  Processes that run together (figure 5) wait at a barrier and are timed from
  the first start to the last end.
- Each measurement gets a fresh database: a copy of a migrated template
  (a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL,
  a table copy on MariaDB), dropped afterwards. On the servers they are
  named ``bench_<pid>_<n>_<side>``. SQLite runs in WAL mode with
  ``synchronous=NORMAL`` for everyone (``init_command``), ours also with
  ``transaction_mode = "IMMEDIATE"`` as its docs recommend; PostgreSQL and
  MariaDB keep their defaults, and so does Django's PostgreSQL backend:
  client-side binding, no prepared statements. ``--pg-prepared`` gives every
  side psycopg 3's server-side binding with prepared statements instead
  (``OPTIONS``: ``server_side_binding``, ``prepare_threshold``), which a
  site without a transaction-mode connection pooler may turn on.
- The SMTP sink is aiosmtpd in a process of its own on 127.0.0.1; it counts
  messages by ``Message-ID`` (every message queued here has its own), so
  every figure also checks that each message arrived exactly once.
- Messages are 2 KB of plain text to one recipient.

The machine is shared (two cores, the database servers and the sink on the
same host, other sessions at work): seconds vary by 10-20 % from run to run,
ratios measured back to back much less. The load average is printed before
and after; ``--repeat N`` runs figures 1-3 N times, the sides taking turns,
and keeps the fastest run of each.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent
OLD_VERSION = "2.3.2"
POST_OFFICE_VERSION = "3.12.0"  # for reference only

FROM = "sender@example.com"
TO = "recipient@example.com"
SUBJECT = "Benchmark message {}"
# 2 KB of text: what a site's notification email weighs, give or take.
BODY = "".join(
    f"Line {line:02d} of the benchmark message body, plain ASCII text to fill two KB.\n" for line in range(26)
)

SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
SQLITE_PRAGMAS = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
# --pg-prepared: psycopg 3 binds parameters on the server and prepares a query run 5 times on a connection.
PG_PREPARED_OPTIONS = {"server_side_binding": True, "prepare_threshold": 5}
CHILD_SCRIPT = "bench_child.py"
RESULT_MARK = "BENCH-RESULT "
READY = "BENCH-READY"
VENDORS = ("sqlite", "postgresql", "mysql")
ENGINES = {
    "sqlite": "django.db.backends.sqlite3",
    "postgresql": "django.db.backends.postgresql",
    "mysql": "django.db.backends.mysql",
}


def message_id(tag: str, number: int) -> str:
    """The Message-ID of message ``number`` of a run: the sink counts arrivals by it."""
    return f"<{number}.{tag}@speed.bench>"


# ===========================================================================
# In the child processes: one task each, result printed as one JSON line.
# This part runs in every implementation's interpreter, so it imports only
# what that side has (Django and its mailer package), and only when asked.
# ===========================================================================


def make_email(number: int, tag: str):
    """Message ``number`` of a run, with its own Message-ID."""
    from django.core.mail import EmailMessage

    return EmailMessage(SUBJECT.format(number), BODY, FROM, [TO], headers={"Message-ID": message_id(tag, number)})


def render(message) -> bytes:
    """Render ``message`` as Django's SMTP backend does (policy SMTP from Django 6.0, CRLF before)."""
    import email.policy
    import inspect

    if "policy" in inspect.signature(message.message).parameters:
        return message.message(policy=email.policy.SMTP).as_bytes()
    return message.message().as_bytes(linesep="\r\n")


def warm_up() -> None:
    """Pay the one-off costs of a process before any timing: the database connection, the host name.

    Both are paid once per process by any implementation; counting them
    would measure start-up, not the per-message cost.
    """
    from django.core.mail.utils import DNS_NAME
    from django.db import connection

    str(DNS_NAME)
    if connection.settings_dict.get("ENGINE") and connection.settings_dict.get("NAME"):
        connection.ensure_connection()


def queued_count(kind: str) -> int:
    """How many messages wait in the side's queue."""
    if kind == "bare":
        from benchbare.models import Message  # type: ignore[import-not-found]  # generated at run time

        return Message.objects.count()
    if kind == "post_office":
        from post_office.models import STATUS, Email  # type: ignore[import-not-found]  # in its virtualenv

        return Email.objects.filter(status=STATUS.queued).count()
    from mailer.models import Message

    return Message.objects.count()


def post_office_kwargs(number: int, tag: str) -> dict:
    """``post_office.mail.send()``'s arguments for message ``number`` (it takes no EmailMessage)."""
    return {
        "recipients": [TO],
        "sender": FROM,
        "subject": SUBJECT.format(number),
        "message": BODY,
        "headers": {"Message-ID": message_id(tag, number)},
    }


def queue_in_bulk(kind: str, numbers: range, tag: str) -> None:
    """Queue messages ``numbers`` with one call of the side's bulk API."""
    if kind == "post_office":
        from post_office import mail  # type: ignore[import-not-found]

        mail.send_many([post_office_kwargs(number, tag) for number in numbers])
    else:
        from mailer.backend import DbBackend

        DbBackend().send_messages([make_email(number, tag) for number in numbers])


def task_prepare(kind: str) -> dict:
    """Create the tables (migrate); report how the database is really configured."""
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    return {"database": describe_database()}


def describe_database() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            import sqlite3

            cursor.execute("PRAGMA journal_mode")
            journal = cursor.fetchone()[0]
            cursor.execute("PRAGMA synchronous")
            synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(cursor.fetchone()[0], "?")
            mode = connection.settings_dict["OPTIONS"].get("transaction_mode") or "DEFERRED"
            return f"SQLite {sqlite3.sqlite_version}, journal_mode={journal}, synchronous={synchronous}, {mode}"
        cursor.execute("SELECT VERSION()")
        version = str(cursor.fetchone()[0]).split(" on ")[0]
        if connection.vendor == "postgresql" and connection.settings_dict["OPTIONS"].get("server_side_binding"):
            return f"{version}, server-side binding, prepared statements"
        return version


def task_capabilities(kind: str) -> dict:
    """What this mailer offers that some figures need (it may still be being written)."""
    import django
    from django.core.management import get_commands, load_command_class

    import mailer

    commands = get_commands()
    send_mail = load_command_class(commands["send_mail"], "send_mail")
    parser = send_mail.create_parser("manage.py", "send_mail")
    options = {option for action in parser._actions for option in action.option_strings}
    try:
        from mailer.conf import DEFAULTS

        setting_names = set(DEFAULTS)
    except ImportError:
        setting_names = set()
    return {
        "mailer": str(Path(mailer.__file__).parent),
        "version": getattr(mailer, "__version__", "?"),
        "django": django.get_version(),
        "python": sys.version.split()[0],
        "runmailer_pg": "runmailer_pg" in commands,
        "connections_option": "--connections" in options,
        "connections_setting": "MAILER_DELIVERY_CONNECTIONS" in setting_names,
    }


def task_fill(kind: str, n: int, tag: str) -> dict:
    """Queue ``n`` messages through the side's own bulk path, untimed: the queue a drain starts from."""
    for start in range(0, n, 2000):
        queue_in_bulk(kind, range(start, min(n, start + 2000)), tag)
    return {"queued": queued_count(kind)}


def drain_command(kind: str) -> list[str]:
    """The command that drains the side's queue once, as cron runs it."""
    if kind == "post_office":
        from django.conf import settings

        return ["send_queued_mail", "--processes", "1", "--lockfile", settings.MAILER_LOCK_PATH]
    return ["send_mail"]


def task_drain(kind: str, barrier: bool = False, command_args: tuple = ()) -> dict:
    """Time ``manage.py send_mail`` (the command, in this process) and the RSS it grows by.

    With ``barrier``, say ready and wait for a line on stdin, so that several
    processes start sending together.
    """
    import importlib

    from django.core.management import call_command

    # Imported before the clock starts: importing is start-up, not sending.
    importlib.import_module("post_office.mail" if kind == "post_office" else "mailer.engine")
    warm_up()
    can_reset = reset_rss_peak()
    rss_start, _ = rss_and_peak()
    if barrier:
        print(READY, flush=True)
        sys.stdin.readline()
    start = time.time()
    call_command(*drain_command(kind), *command_args)
    end = time.time()
    _, peak = rss_and_peak()
    return {
        "start": start,
        "end": end,
        "rss_start": rss_start,
        "rss_growth": peak - rss_start if can_reset else None,
        "remaining": queued_count(kind),
    }


def task_django_send(
    kind: str, n: int, tag: str, host: str, port: int, connections: int = 1, barrier: bool = False, first: int = 0
) -> dict:
    """Send ``n`` messages with Django's SMTP backend, without a queue: the limit for any queue.

    Over one connection, or over ``connections`` at once, one per thread (each
    sending its share): what a single Python process can do at best when the
    mail server is slow. ``barrier`` as for ``task_drain``; ``first``: the
    number of the first message, when several processes share the work.
    """
    import threading

    from django.core.mail.backends.smtp import EmailBackend

    warm_up()
    emails = [make_email(number, tag) for number in range(first, first + n)]
    shares = [emails[thread::connections] for thread in range(connections)]
    sent: list[int] = []
    errors: list[BaseException] = []

    def send(share: list) -> None:
        try:
            sent.append(EmailBackend(host=host, port=port, timeout=60).send_messages(share))
        except BaseException as exc:  # raised again below: the run fails rather than looking fast
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(share,)) for share in shares]
    if barrier:
        print(READY, flush=True)
        sys.stdin.readline()
    start = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.time()
    if errors:
        raise errors[0]
    return {"start": start, "end": end, "sent": sum(sent)}


def task_smtplib_send(kind: str, n: int, tag: str, host: str, port: int) -> dict:
    """Send ``n`` pre-rendered messages with bare ``smtplib``: the floor, what the wire and the sink cost."""
    import smtplib

    warm_up()
    payloads = [render(make_email(number, tag)) for number in range(n)]
    start = time.time()
    with smtplib.SMTP(host, port, timeout=60) as smtp:
        for payload in payloads:
            smtp.sendmail(FROM, [TO], payload)
    end = time.time()
    return {"start": start, "end": end, "sent": n, "size": sum(map(len, payloads)) // max(n, 1)}


def task_queue_loop(kind: str, n: int, tag: str = "") -> dict:
    """Queue ``n`` messages one call (and one commit) each, as a web page sending mail does.

    ``bare`` is the limit: the ORM inserting a pre-rendered message into a
    table shaped like django-mailer's, with no validation or encoding.
    """
    warm_up()
    if kind == "bare":
        from benchbare.models import Message

        text = render(make_email(0, "bare")).decode()
        start = time.time()
        for _ in range(n):
            Message.objects.create(message_data=text, priority="2")
        end = time.time()
    elif kind == "post_office":
        from post_office import mail

        start = time.time()
        for number in range(n):
            mail.send([TO], FROM, subject=SUBJECT.format(number), message=BODY)
        end = time.time()
    else:
        import mailer

        start = time.time()
        for number in range(n):
            mailer.send_mail(SUBJECT.format(number), BODY, FROM, [TO])
        end = time.time()
    return {"start": start, "end": end, "queued": queued_count(kind)}


def task_queue_bulk(kind: str, n: int, tag: str) -> dict:
    """Queue ``n`` emails in one call: ``DbBackend.send_messages``, ``mail.send_many``, or a bare ``bulk_create``."""
    warm_up()
    if kind == "bare":
        from benchbare.models import Message

        text = render(make_email(0, tag)).decode()
        start = time.time()
        Message.objects.bulk_create([Message(message_data=text, priority="2") for _ in range(n)])
        end = time.time()
    elif kind == "post_office":
        from post_office import mail

        arguments = [post_office_kwargs(number, tag) for number in range(n)]
        start = time.time()
        mail.send_many(arguments)
        end = time.time()
    else:
        from mailer.backend import DbBackend

        emails = [make_email(number, tag) for number in range(n)]
        backend = DbBackend()
        start = time.time()
        backend.send_messages(emails)
        end = time.time()
    return {"start": start, "end": end, "queued": queued_count(kind)}


def task_produce(kind: str, n: int, tag: str, interval: float) -> dict:
    """Queue ``n`` messages one at a time, ``interval`` seconds apart; note when each was committed.

    ``DbBackend.send_messages`` of one email commits before it returns
    (autocommit), so the time taken after it is the commit's.
    """
    from mailer.backend import DbBackend

    warm_up()
    backend = DbBackend()
    commits = {}
    next_at = time.monotonic()
    for number in range(n):
        email = make_email(number, tag)
        backend.send_messages([email])
        commits[message_id(tag, number)] = time.time()
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    return {"commits": commits}


CLEAR_REFS = "/proc/self/clear_refs"


def reset_rss_peak() -> bool:
    """Reset the RSS high-water mark (Linux: write 5 to clear_refs); tell whether it could be done."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_and_peak() -> tuple[int, int]:
    """Current RSS and its high-water mark since the last reset, in bytes (0, 0 where /proc has none)."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kb, _unit = line.split()
                values[name] = int(kb) * 1024
    return values["VmRSS:"], values["VmHWM:"]


TASKS: dict[str, Callable[..., dict]] = {
    "prepare": task_prepare,
    "capabilities": task_capabilities,
    "fill": task_fill,
    "drain": task_drain,
    "django_send": task_django_send,
    "smtplib_send": task_smtplib_send,
    "queue_loop": task_queue_loop,
    "queue_bulk": task_queue_bulk,
    "produce": task_produce,
}


def child_main(task: str) -> None:
    """Run one task in this (child) process; its parameters come in BENCH_PARAMS."""
    import django

    params = json.loads(os.environ.get("BENCH_PARAMS", "{}"))
    django.setup()
    result = TASKS[task](**params)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ===========================================================================
# The SMTP sink, in a process of its own.
# ===========================================================================

MESSAGE_ID_HEADER = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


class SinkHandler:
    """aiosmtpd handler: accept every message, after ``delay`` seconds; count it by Message-ID.

    The delay is an ``asyncio.sleep``, so connections are served side by side,
    as by a mail server whose answer takes that long. State is read from the
    control thread, hence the lock.
    """

    def __init__(self) -> None:
        import threading

        self.changed = threading.Condition()
        self.reset(0.0)

    def reset(self, delay: float) -> None:
        with self.changed:
            self.delay = delay
            self.counts: Counter[str] = Counter()
            self.arrived: dict[str, float] = {}
            self.received = 0
            self.size = 0
            self.connections = 0
            self.in_flight = 0
            self.peak_in_flight = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.changed:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):
        import asyncio

        arrived = time.time()
        data = envelope.original_content
        header_end = data.find(b"\r\n\r\n")
        match = MESSAGE_ID_HEADER.search(data, 0, header_end if header_end >= 0 else len(data))
        identifier = match.group(1).decode("ascii", "replace") if match else "(none)"
        with self.changed:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            delay = self.delay
        if delay:
            await asyncio.sleep(delay)
        with self.changed:
            self.in_flight -= 1
            self.received += 1
            self.size += len(data)
            self.counts[identifier] += 1
            self.arrived.setdefault(identifier, arrived)
            self.changed.notify_all()
        return "250 Message accepted for delivery"

    # Commands from the benchmark, through the control pipe.

    def stats(self) -> dict:
        with self.changed:
            return {
                "received": self.received,
                "average_size": self.size // max(self.received, 1),
                "connections": self.connections,
                "peak_in_flight": self.peak_in_flight,
            }

    def message_counts(self) -> dict[str, int]:
        with self.changed:
            return dict(self.counts)

    def arrivals(self) -> dict[str, float]:
        with self.changed:
            return dict(self.arrived)

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.received >= count, timeout)


def run_sink(control) -> None:
    """The sink process: serve SMTP on 127.0.0.1, answer commands on ``control`` until told to stop."""
    from aiosmtpd.controller import Controller

    class LoopbackController(Controller):
        """Listen on a port the system picks, so two runs never collide."""

        async def _create_server(self):
            server = await super()._create_server()
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            return server

    handler = SinkHandler()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=0, data_size_limit=None)
    controller.start()
    control.send(controller.port)
    commands: dict[str, Callable[..., Any]] = {
        "reset": handler.reset,
        "stats": handler.stats,
        "counts": handler.message_counts,
        "arrivals": handler.arrivals,
        "wait_for": handler.wait_for,
    }
    while True:
        try:
            name, *args = control.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if name == "stop":
            break
        control.send(commands[name](*args))
    controller.stop()


class Sink:
    """The sink process, seen from the benchmark."""

    def __init__(self) -> None:
        import multiprocessing

        # spawn: the sink starts clean, without a copy of this process.
        context = multiprocessing.get_context("spawn")
        self.control, theirs = context.Pipe()
        self.process = context.Process(target=run_sink, args=(theirs,), daemon=True)
        self.process.start()
        self.host = "127.0.0.1"
        if not self.control.poll(60):
            raise RuntimeError("the SMTP sink did not start (is aiosmtpd installed?)")
        self.port: int = self.control.recv()

    def _call(self, name: str, *args: Any) -> Any:
        self.control.send((name, *args))
        return self.control.recv()

    def reset(self, delay: float = 0.0) -> None:
        """Forget what arrived; from now on accept each message after ``delay`` seconds."""
        self._call("reset", delay)

    def stats(self) -> dict:
        return self._call("stats")

    def counts(self) -> dict[str, int]:
        return self._call("counts")

    def arrivals(self) -> dict[str, float]:
        return self._call("arrivals")

    def wait_for(self, count: int, timeout: float) -> bool:
        return self._call("wait_for", count, timeout)

    def delivery(self, tag: str, n: int) -> "Delivery":
        """How the ``n`` messages of run ``tag`` arrived: each exactly once, or what went wrong."""
        counts = self.counts()
        expected = {message_id(tag, number) for number in range(n)}
        return Delivery(
            missing=len(expected - counts.keys()),
            duplicated=sum(count - 1 for identifier, count in counts.items() if identifier in expected),
            unexpected=sum(count for identifier, count in counts.items() if identifier not in expected),
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(("stop",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


@dataclass(frozen=True)
class Delivery:
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0

    @property
    def exactly_once(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def describe(self) -> str:
        if self.exactly_once:
            return "exactly once"
        parts = [
            f"{self.missing} missing" if self.missing else "",
            f"{self.duplicated} duplicated" if self.duplicated else "",
            f"{self.unexpected} unexpected" if self.unexpected else "",
        ]
        return ", ".join(part for part in parts if part)


# ===========================================================================
# The implementations, their virtualenvs, and running their processes.
# ===========================================================================


@dataclass(frozen=True)
class Side:
    """One implementation or baseline: which interpreter runs it, with which apps."""

    key: str
    label: str
    kind: str  # "mailer" (ours and 2.3.2), "post_office", "bare" (the ORM baseline), "plain" (no database)
    python: str
    path: tuple[str, ...] = ()  # PYTHONPATH besides the generated site
    apps: tuple[str, ...] = ()
    immediate: bool = False  # SQLite transaction_mode IMMEDIATE (what our docs recommend)
    note: str = ""

    def runs_on(self, vendor: str) -> bool:
        """False on MariaDB when its driver could not be installed."""
        return vendor != "mysql" or "no mysqlclient" not in self.note


def installed_django_version() -> str:
    from importlib.metadata import version

    return version("django")


def ensure_virtualenv(cache: Path, name: str, requirements: list[str]) -> Path:
    """A virtualenv under ``cache`` with ``requirements`` installed; reused when already made.

    It is made with this interpreter's Python, so only the packages differ.
    A marker file written last says the install completed.
    """
    directory = cache / name
    python = directory / "bin" / "python"
    marker = directory / "bench-requirements.txt"
    wanted = "\n".join(requirements)
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    shutil.rmtree(directory, ignore_errors=True)
    print(f"  making {directory} ({' '.join(requirements)}) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", *requirements]
    installed = subprocess.run(pip, capture_output=True, text=True)
    if installed.returncode:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed: {installed.stderr.strip()[-300:]}")
    marker.write_text(wanted)
    return python


def installed_side(cache: Path, key: str, label: str, package: str, kind: str, apps: tuple[str, ...]) -> Side:
    """A baseline installed from PyPI, with this interpreter's Django if it installs there, else Django 5.2.

    The database drivers come along; without mysqlclient (it compiles on
    some machines) the side is still measured on SQLite and PostgreSQL.
    """
    python_tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    drivers = ["psycopg[binary]", "mysqlclient"]
    ours = installed_django_version()
    errors = []
    for django_version, django_requirement in ((ours, f"django=={ours}"), ("5.2", "django>=5.2,<5.3")):
        for extra in (drivers, drivers[:1]):
            name = f"{package.replace('==', '-')}-django{django_version}-{python_tag}" + (
                "" if extra == drivers else "-pg"
            )
            try:
                python = ensure_virtualenv(cache, name, [package, django_requirement, *extra])
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                errors.append(str(exc))
                continue
            notes = [f"on Django {django_version}: Django {ours} would not install"] if django_version != ours else []
            if extra != drivers:
                notes.append("no mysqlclient: not measured on MariaDB")
            return Side(key, label, kind, str(python), apps=apps, note="; ".join(notes))
    raise RuntimeError(f"could not install {package}: {errors}")


def old_mailer_side(cache: Path) -> Side:
    return installed_side(
        cache, "old", f"django-mailer {OLD_VERSION}", f"django-mailer=={OLD_VERSION}", "mailer", ("mailer",)
    )


def post_office_side(cache: Path) -> Side:
    return installed_side(
        cache,
        "po",
        f"django-post-office {POST_OFFICE_VERSION}",
        f"django-post-office=={POST_OFFICE_VERSION}",
        "post_office",
        ("post_office",),
    )


def our_side() -> Side:
    return Side("ours", "ours", "mailer", sys.executable, path=(str(REPO_ROOT),), apps=("mailer",), immediate=True)


def bare_side() -> Side:
    return Side("bare", "bare ORM", "bare", sys.executable, apps=("benchbare",))


def plain_side() -> Side:
    return Side("plain", "Django", "plain", sys.executable)


SETTINGS_MODULE = '''\
"""Settings of a benchmark process, given by speed.py in BENCH_SETTINGS (JSON)."""
import json
import os

globals().update(json.loads(os.environ["BENCH_SETTINGS"]))
'''

MANAGE_PY = """\
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench_settings")
from django.core.management import execute_from_command_line

execute_from_command_line(sys.argv)
"""

BARE_MODELS = '''\
"""The baseline of queueing: a table shaped like django-mailer's, written by the ORM and nothing else."""
from django.db import models
from django.utils import timezone


class Message(models.Model):
    message_data = models.TextField()
    when_added = models.DateTimeField(default=timezone.now)
    priority = models.CharField(max_length=1, default="2")
'''


def write_site(directory: Path) -> None:
    """The generated project every child process imports: settings module, manage.py, the bare app.

    The children run a copy of this script, so that editing it during a
    long run changes nothing in that run.
    """
    shutil.copyfile(SCRIPT, directory / CHILD_SCRIPT)
    (directory / "bench_settings.py").write_text(SETTINGS_MODULE)
    (directory / "manage.py").write_text(MANAGE_PY)
    (directory / "benchbare").mkdir()
    (directory / "benchbare" / "__init__.py").write_text("")
    (directory / "benchbare" / "models.py").write_text(BARE_MODELS)


class ChildFailed(RuntimeError):
    """A benchmark process failed; the message ends with the tail of its stderr."""


@dataclass
class Runner:
    """Starts the processes of every side, with settings pointing at their database and the sink."""

    site: Path
    sink: Sink

    def settings(self, side: Side, database: "Database | None", extra: dict | None = None) -> dict:
        """The Django settings of a child: its database, delivery to the sink over SMTP, no debug."""
        settings: dict[str, Any] = {
            "SECRET_KEY": "benchmark",
            "DEBUG": False,
            "USE_TZ": True,
            "TIME_ZONE": "UTC",
            "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
            "INSTALLED_APPS": list(side.apps),
            "DATABASES": {"default": database.django_settings(side.immediate)} if database else {},
            "MAILER_EMAIL_BACKEND": SMTP_BACKEND,
            "EMAIL_HOST": self.sink.host,
            "EMAIL_PORT": self.sink.port,
            "EMAIL_TIMEOUT": 60,
            "MAILER_LOCK_PATH": str(self.site / f"lock-{database.label if database else 'none'}"),
        }
        if side.kind == "post_office":
            # Its own Message-ID would replace ours, by which the sink counts;
            # it renders every message through the template engine.
            settings["POST_OFFICE"] = {"MESSAGE_ID_ENABLED": False, "BACKENDS": {"default": SMTP_BACKEND}}
            settings["TEMPLATES"] = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
        settings.update(extra or {})
        return settings

    def environment(self, side: Side, database: "Database | None", settings: dict | None, params: dict) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.site), *side.path]),
            DJANGO_SETTINGS_MODULE="bench_settings",
            BENCH_SETTINGS=json.dumps(self.settings(side, database, settings)),
            BENCH_PARAMS=json.dumps({"kind": side.kind, **params}),
            # Django 6.1 deprecates the EMAIL_* settings that 2.3.2 needs; the warnings are noise here.
            PYTHONWARNINGS="ignore",
        )
        return env

    def start(
        self, side: Side, argv: list[str], database: "Database | None" = None, settings: dict | None = None, **params
    ) -> tuple[subprocess.Popen, Path]:
        """Start ``side.python argv`` with stdin and stdout piped; stderr goes to a file (returned)."""
        stderr_path = Path(tempfile.mkstemp(prefix="stderr-", suffix=".txt", dir=self.site)[1])
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen(
                [side.python, *argv],
                env=self.environment(side, database, settings, params),
                cwd=self.site,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        return process, stderr_path

    def run(
        self,
        side: Side,
        task: str,
        database: "Database | None" = None,
        settings: dict | None = None,
        timeout: float = 600,
        **params,
    ) -> dict:
        """Run one task in a new process of ``side``; return its result."""
        process, stderr = self.start(
            side, [str(self.site / CHILD_SCRIPT), "--child", task], database, settings, **params
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise ChildFailed(f"{side.label} {task}: no answer after {timeout:.0f} s") from None
        return self.result(side, task, process, output, stderr)

    def run_together(
        self,
        side: Side,
        count: int,
        database: "Database | None",
        settings: dict | None,
        timeout: float,
        task: str = "drain",
        each: Callable[[int], dict] = lambda _process: {},
        **params,
    ) -> list[dict]:
        """Run ``count`` processes of ``side`` doing ``task`` (drain, by default) that start at the same moment.

        ``each(k)`` gives parameters of the k-th process of its own.
        """
        argv = [str(self.site / CHILD_SCRIPT), "--child", task]
        started = [
            self.start(side, argv, database, settings, barrier=True, **params, **each(process))
            for process in range(count)
        ]
        try:
            for process, stderr in started:
                line = process.stdout.readline() if process.stdout else ""
                if line.strip() != READY:
                    process.wait(timeout=30)
                    raise ChildFailed(f"{side.label} {task} did not get ready: {line!r}{tail(stderr)}")
            for process, _ in started:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            deadline = time.monotonic() + timeout
            results = []
            for process, stderr in started:
                output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append(self.result(side, task, process, output, stderr))
            return results
        finally:
            for process, _ in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()

    @staticmethod
    def result(side: Side, task: str, process: subprocess.Popen, output: str, stderr: Path) -> dict:
        lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
        if process.returncode != 0 or not lines:
            raise ChildFailed(f"{side.label} {task} failed (exit {process.returncode}){tail(stderr)}")
        return json.loads(lines[-1][len(RESULT_MARK) :])


def server_went_away(error: Exception) -> bool:
    """Whether a failure looks like the database server restarting or refusing connections for a moment."""
    text = str(error)
    return any(sign in text for sign in ("shutting down", "starting up", "server closed the connection", "refused"))


def summary(error: Exception) -> str:
    """The first and last lines of an error (what failed, and the exception that ended it), for the table."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a child's stderr, to say why it failed."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (":\n      " + "\n      ".join(text)) if text else ""


# ===========================================================================
# Databases: a migrated template per side and vendor, a fresh copy per measurement.
# ===========================================================================


def server_settings(vendor: str) -> dict:
    """Where the PostgreSQL or MariaDB server is: the test suite's MAILER_TEST_DB_* variables, or loopback."""
    env = os.environ.get
    return {
        "HOST": env("MAILER_TEST_DB_HOST", "127.0.0.1"),
        "PORT": env("MAILER_TEST_DB_PORT", {"postgresql": "5432", "mysql": "3306"}[vendor]),
        "USER": env("MAILER_TEST_DB_USER", "mailer"),
        "PASSWORD": env("MAILER_TEST_DB_PASSWORD", "mailer"),
    }


@dataclass(frozen=True)
class Database:
    vendor: str
    name: str  # SQLite: the file's path; servers: the database's name
    label: str
    pg_prepared: bool = False  # --pg-prepared

    def django_settings(self, immediate: bool) -> dict:
        """This database as a DATABASES entry: SQLite in WAL mode for everyone; servers with their defaults."""
        if self.vendor == "sqlite":
            options: dict[str, Any] = {"init_command": SQLITE_PRAGMAS, "timeout": 30}
            if immediate:
                options["transaction_mode"] = "IMMEDIATE"
            return {"ENGINE": ENGINES["sqlite"], "NAME": self.name, "OPTIONS": options}
        settings = {"ENGINE": ENGINES[self.vendor], "NAME": self.name, **server_settings(self.vendor)}
        if self.vendor == "mysql":
            settings["OPTIONS"] = {"charset": "utf8mb4"}
        if self.vendor == "postgresql" and self.pg_prepared:
            settings["OPTIONS"] = PG_PREPARED_OPTIONS
        return settings


class Server:
    """CREATE, copy and DROP databases on a PostgreSQL or MariaDB server, with the plain driver."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.settings = server_settings(vendor)

    def connect(self, name: str | None = None):
        s = self.settings
        if self.vendor == "postgresql":
            import psycopg

            return psycopg.connect(
                host=s["HOST"], port=int(s["PORT"]), user=s["USER"], password=s["PASSWORD"],
                dbname=name or "postgres", connect_timeout=10, autocommit=True,
            )  # fmt: skip
        import MySQLdb

        options = {"database": name} if name else {}
        return MySQLdb.connect(
            host=s["HOST"], port=int(s["PORT"]), user=s["USER"], password=s["PASSWORD"],
            charset="utf8mb4", connect_timeout=10, autocommit=True, **options,
        )  # fmt: skip

    def execute(self, *statements: str, database: str | None = None) -> None:
        with contextlib.closing(self.connect(database)) as connection:
            cursor = connection.cursor()
            for statement in statements:
                cursor.execute(statement)

    def query(self, sql: str, params: list[Any], database: str | None = None) -> list[tuple[Any, ...]]:
        with contextlib.closing(self.connect(database)) as connection:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            return [tuple(row) for row in cursor.fetchall()]

    def available(self) -> str | None:
        """None when the server answers; else why not."""
        try:
            self.execute("SELECT 1")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def create(self, name: str) -> None:
        if self.vendor == "postgresql":
            self.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8'")
        else:
            self.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")

    def copy(self, source: str, target: str) -> None:
        """A new database ``target`` with the tables and rows of ``source`` (which nobody is using)."""
        if self.vendor == "postgresql":
            for attempt in range(20):  # an autovacuum worker may be visiting the template
                try:
                    self.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')
                    return
                except Exception as exc:
                    if "being accessed" not in str(exc) or attempt == 19:
                        raise
                    time.sleep(0.5)
        self.create(target)
        with contextlib.closing(self.connect(target)) as connection:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = %s AND table_type = 'BASE TABLE'",
                [source],
            )
            tables = [row[0] for row in cursor.fetchall()]
            cursor.execute("SET FOREIGN_KEY_CHECKS = 0")
            for table in tables:
                cursor.execute(f"SHOW CREATE TABLE `{source}`.`{table}`")
                cursor.execute(cursor.fetchone()[1])  # unqualified: made in the target, this connection's database
                cursor.execute(f"INSERT INTO `{table}` SELECT * FROM `{source}`.`{table}`")  # noqa: S608
            cursor.execute("SET FOREIGN_KEY_CHECKS = 1")

    def drop(self, name: str) -> None:
        if self.vendor == "postgresql":
            self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            self.execute(f"DROP DATABASE IF EXISTS `{name}`")


class Databases:
    """Makes every database a measurement runs on, and drops them all in the end.

    A template is migrated once per side and vendor; each measurement runs on
    a fresh copy of it, so no run inherits the rows, the log or the bloat of
    another, and no run pays for migrations.
    """

    def __init__(self, directory: Path, runner: Runner, pg_prepared: bool = False) -> None:
        self.directory = directory
        self.runner = runner
        self.pg_prepared = pg_prepared
        self.servers = {vendor: Server(vendor) for vendor in ("postgresql", "mysql")}
        self.templates: dict[tuple[str, str], Database] = {}
        self.descriptions: dict[tuple[str, str], str] = {}
        self.made: list[Database] = []
        self.counter = 0

    def unavailable(self, vendor: str) -> str | None:
        return None if vendor == "sqlite" else self.servers[vendor].available()

    def _new(self, vendor: str, side: Side, role: str) -> Database:
        self.counter += 1
        label = f"bench_{os.getpid()}_{self.counter}_{side.key}_{role}"
        name = str(self.directory / f"{label}.sqlite3") if vendor == "sqlite" else label
        database = Database(vendor, name, label, self.pg_prepared)
        self.made.append(database)
        return database

    def template(self, side: Side, vendor: str) -> Database:
        key = (side.key, vendor)
        if key not in self.templates:
            database = self._new(vendor, side, "template")
            if vendor != "sqlite":
                self.servers[vendor].create(database.name)
            result = self.runner.run(side, "prepare", database, timeout=300)
            self.templates[key] = database
            self.descriptions[key] = result["database"]
        return self.templates[key]

    @contextlib.contextmanager
    def fresh(self, side: Side, vendor: str) -> Iterator[Database]:
        """A copy of the side's migrated template for one measurement, dropped afterwards."""
        template = self.template(side, vendor)
        database = self._new(vendor, side, "run")
        if vendor == "sqlite":
            for suffix in ("", "-wal"):
                if Path(template.name + suffix).exists():
                    shutil.copyfile(template.name + suffix, database.name + suffix)
        else:
            self.servers[vendor].copy(template.name, database.name)
        try:
            yield database
        finally:
            self.drop(database)

    def drop(self, database: Database) -> None:
        """Drop ``database``; if its server cannot be reached now, it stays listed for ``drop_all``."""
        if database not in self.made:
            return
        if database.vendor == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(database.name + suffix).unlink(missing_ok=True)
        else:
            try:
                self.servers[database.vendor].drop(database.name)
            except Exception as exc:
                print(f"  could not drop {database.name} now: {summary(exc)}", file=sys.stderr)
                return
        self.made.remove(database)

    def drop_all(self) -> None:
        """Drop what is left, waiting a little for a server that is restarting."""
        for attempt in range(4):
            for database in list(self.made):
                self.drop(database)
            if not self.made:
                return
            time.sleep(5 * (attempt + 1))
        names = ", ".join(database.name for database in self.made)
        print(f"  left behind (drop them by hand): {names}", file=sys.stderr)


# ===========================================================================
# Measuring.
# ===========================================================================


@dataclass(frozen=True)
class Sizes:
    drain: int = 5000
    queue: int = 3000
    bulk: int = 3000
    scale: tuple[int, ...] = (3000, 30000)
    huge: int = 100_000  # figure 4 on PostgreSQL, with --huge
    parallel: int = 1000
    delay: float = 0.020
    processes: int = 4
    connections: int = 8
    latency: int = 500
    interval: float = 0.05  # between two messages of the latency figure


QUICK = Sizes(drain=150, queue=200, bulk=200, scale=(150, 600), huge=1500, parallel=60, latency=25, interval=0.04)


@dataclass(frozen=True)
class Run:
    """What one timed run gave: how many messages, in how long, and how they arrived."""

    n: int
    seconds: float
    delivery: Delivery | None = None  # None: nothing was sent (queueing figures)
    rss_growth: int | None = None  # bytes, peak above the start of the drain
    problem: str = ""  # e.g. messages left in the queue
    peak_in_flight: int = 0  # most messages the sink was taking at once

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else math.inf

    @property
    def ms_per_message(self) -> float:
        return 1000 * self.seconds / self.n

    @property
    def ok(self) -> bool:
        return not self.problem and (self.delivery is None or self.delivery.exactly_once)

    def describe(self) -> str:
        parts = [self.delivery.describe() if self.delivery else "", self.problem]
        return "; ".join(part for part in parts if part)


@dataclass
class Row:
    figure: str
    db: str
    what: str
    result: str
    ratio: str = ""
    goal: str = ""
    verdict: str = ""
    note: str = ""


def judge(ratio: float, at_least: float | None, at_most: float | None, ok: bool) -> str:
    """PASS when the ratio meets the goal and every message arrived exactly once."""
    met = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
    return "PASS" if met and ok else "FAIL"


def goal_text(at_least: float | None, at_most: float | None) -> str:
    if at_least is not None:
        return f">= {at_least}x"
    if at_most is not None:
        return f"<= {at_most}x"
    return "report"


class Bench:
    """One benchmark run: the sink, the sides, the databases, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, site: Path, sink: Sink) -> None:
        self.args = args
        self.sizes = sizes
        self.sink = sink
        self.runner = Runner(site, sink)
        self.databases = Databases(site, self.runner, args.pg_prepared)
        self.rows: list[Row] = []
        self.tags = 0
        self.ours = our_side()
        self.bare = bare_side()
        self.plain = plain_side()
        self.old: Side | None = None
        self.old_problem = ""
        self.post_office: Side | None = None
        self.problems: list[str] = []
        self.capabilities: dict = {}

    def add(self, row: Row) -> None:
        """Keep the row for the table, and show it now: a long run shows its progress."""
        self.rows.append(row)
        shown = (row.db, row.what, row.result, row.ratio, row.verdict, row.note.splitlines()[0] if row.note else "")
        print("  " + " | ".join(part for part in shown if part), file=sys.stderr, flush=True)

    def tag(self) -> str:
        """A name for one run's messages, part of their Message-IDs."""
        self.tags += 1
        return f"t{os.getpid()}x{self.tags}"

    # Runs -----------------------------------------------------------------

    def send_directly(self, task: str, n: int, delay: float = 0.0, processes: int = 1, connections: int = 1) -> Run:
        """A baseline that sends without a queue (Django's SMTP backend, or smtplib).

        With ``processes``, that many processes share the messages, starting
        together; with ``connections`` (``django_send`` only), each process
        sends over that many at once.
        """
        if task != "django_send" and (processes > 1 or connections > 1):
            raise ValueError(f"{task} sends over one connection from one process")
        tag = self.tag()
        self.sink.reset(delay)
        params: dict[str, Any] = {"host": self.sink.host, "port": self.sink.port, "tag": tag}
        if connections > 1:
            params["connections"] = connections
        timeout = 60 + n * (0.1 + delay)
        if processes == 1:
            results = [self.runner.run(self.plain, task, None, timeout=timeout, n=n, **params)]
        else:
            # Process k sends messages bounds[k] to bounds[k + 1] - 1: shares as even as they can be.
            bounds = [n * k // processes for k in range(processes + 1)]
            results = self.runner.run_together(
                self.plain,
                processes,
                None,
                None,
                timeout,
                task=task,
                each=lambda k: {"first": bounds[k], "n": bounds[k + 1] - bounds[k]},
                **params,
            )
        return Run(
            n,
            max(result["end"] for result in results) - min(result["start"] for result in results),
            self.sink.delivery(tag, n),
            peak_in_flight=self.sink.stats()["peak_in_flight"],
        )

    def drain(
        self,
        side: Side,
        vendor: str,
        n: int,
        processes: int = 1,
        delay: float = 0.0,
        settings: dict | None = None,
        command_args: tuple[str, ...] = (),
    ) -> Run:
        """Queue ``n`` messages (untimed), then time ``processes`` ``send_mail`` processes draining them."""
        tag = self.tag()
        with self.databases.fresh(side, vendor) as database:
            filled = self.runner.run(side, "fill", database, timeout=120 + n * 0.05, n=n, tag=tag)
            if filled["queued"] != n:
                raise ChildFailed(f"{side.label}: {filled['queued']} messages queued instead of {n}")
            self.sink.reset(delay)
            timeout = 120 + n * (0.2 + delay)
            results = self.runner.run_together(
                side, processes, database, settings, timeout, command_args=list(command_args)
            )
        growth = [result["rss_growth"] for result in results if result["rss_growth"] is not None]
        remaining = min(result["remaining"] for result in results)
        return Run(
            n,
            max(result["end"] for result in results) - min(result["start"] for result in results),
            self.sink.delivery(tag, n),
            rss_growth=max(growth) if growth else None,
            problem=f"{remaining} left in the queue" if remaining else "",
            peak_in_flight=self.sink.stats()["peak_in_flight"],
        )

    def queue(self, side: Side, vendor: str, task: str, n: int) -> Run:
        """Time queueing ``n`` messages (``queue_loop`` or ``queue_bulk``) into a fresh database."""
        with self.databases.fresh(side, vendor) as database:
            result = self.runner.run(side, task, database, timeout=120 + n * 0.1, n=n, tag=self.tag())
        problem = "" if result["queued"] == n else f"{result['queued']} queued instead of {n}"
        return Run(n, result["end"] - result["start"], problem=problem)


class Figure:
    """The rows of one figure on one database: measurements, a base, and ratios to it."""

    def __init__(self, bench: Bench, title: str, vendor: str) -> None:
        self.bench = bench
        self.title = title
        self.vendor = vendor

    def measure(self, what: str, measure: Callable[[], Any]) -> Any:
        """Run a measurement; a failure becomes a row saying so, and the benchmark goes on.

        One that looks like the database server going away (other work on a
        shared machine restarts it) is tried once more, and the footer says so.
        """
        for attempt in (1, 2):
            try:
                return measure()
            except (ChildFailed, subprocess.SubprocessError, OSError) as exc:
                print(f"  {self.vendor} | {what} failed: {exc}", file=sys.stderr, flush=True)
                if attempt == 1 and server_went_away(exc):
                    self.bench.problems.append(f"{self.title}, {self.vendor}, {what}: tried again after {summary(exc)}")
                    time.sleep(15)
                    continue
                self.row(what, "error", verdict="ERROR", note=summary(exc))
        return None

    def measure_in_rounds(self, measures: Mapping[str, Callable[[], Run]]) -> dict[str, Run]:
        """Each measurement ``--repeat`` times, in turns (A B C, A B C), keeping the fastest of each.

        Taking turns spreads a slow spell of the machine (another session's
        test run, a checkpoint of the database server) over every side
        instead of landing on one; the fastest run is kept, since noise
        only ever slows a run down. A measurement that fails is not retried
        in later rounds.
        """
        best: dict[str, Run] = {}
        failed: set[str] = set()
        for _ in range(max(1, self.bench.args.repeat)):
            for what, measure in measures.items():
                if what in failed:
                    continue
                run = self.measure(what, measure)
                if run is None:
                    failed.add(what)
                elif what not in best or run.seconds < best[what].seconds:
                    best[what] = run
        return {what: best[what] for what in measures if what in best}

    def row(self, what: str, result: str, ratio: str = "", goal: str = "", verdict: str = "", note: str = "") -> None:
        self.bench.add(Row(self.title, self.vendor, what, result, ratio, goal, verdict, note))

    def base(self, what: str, run: Run, note: str = "") -> None:
        """The row the others are compared with."""
        self.row(what, f"{run.rate:,.0f} msg/s", "1.00x", verdict="" if run.ok else "FAIL", note=note or run.describe())

    def compare_all(self, runs: dict[str, Run], base: str, goals: dict[str, float]) -> None:
        """Rows for ``runs``: the one named ``base`` first, then every other as a multiple of it.

        ``goals`` gives the least ratio some of them must reach; the others are reported.
        """
        if base not in runs:
            return
        self.base(base, runs[base])
        for what, run in runs.items():
            if what != base:
                self.compare(what, run, runs[base], at_least=goals.get(what))

    def compare(
        self, what: str, run: Run, base: Run, at_least: float | None = None, at_most: float | None = None, note=""
    ) -> None:
        """A row with ``run``'s rate as a multiple of ``base``'s, judged against the goal if there is one."""
        ratio = run.rate / base.rate
        has_goal = at_least is not None or at_most is not None
        verdict = judge(ratio, at_least, at_most, run.ok) if has_goal else ("" if run.ok else "FAIL")
        note = "; ".join(part for part in (run.describe(), note) if part)
        self.row(what, f"{run.rate:,.0f} msg/s", f"{ratio:.2f}x", goal_text(at_least, at_most), verdict, note)


# Figure 1 ------------------------------------------------------------------


def figure_drain(bench: Bench, vendor: str) -> None:
    """Drain N queued messages; the limit is Django's SMTP backend sending them without a queue."""
    n = bench.sizes.drain
    figure = Figure(bench, f"1 drain {n:,}", vendor)
    limit = "Django SMTP backend, 1 connection (limit)"
    measures = {
        limit: functools.partial(bench.send_directly, "django_send", n),
        "raw smtplib, pre-rendered bytes (floor)": functools.partial(bench.send_directly, "smtplib_send", n),
        "ours: send_mail": functools.partial(bench.drain, bench.ours, vendor, n),
    }
    # post-office sends over THREADS_PER_PROCESS connections at once (5 by default), as a site gets it.
    for side, command in ((bench.old, "send_mail"), (bench.post_office, "send_queued_mail, 5 threads")):
        if side is not None and side.runs_on(vendor):
            measures[f"{side.label}: {command}"] = functools.partial(bench.drain, side, vendor, n)
    figure.compare_all(figure.measure_in_rounds(measures), limit, {"ours: send_mail": 0.8})


# Figures 2 and 3 -------------------------------------------------------------


def figure_queue(bench: Bench, vendor: str) -> None:
    """Queue one message per call; the limit is a bare ORM insert loop."""
    n = bench.sizes.queue
    figure = Figure(bench, f"2 queue 1 by 1, {n:,}", vendor)
    limit = "Message.objects.create() loop (limit)"
    measures = {
        limit: functools.partial(bench.queue, bench.bare, vendor, "queue_loop", n),
        "ours: mailer.send_mail() loop": functools.partial(bench.queue, bench.ours, vendor, "queue_loop", n),
    }
    for side, call in ((bench.old, "mailer.send_mail()"), (bench.post_office, "mail.send()")):
        if side is not None and side.runs_on(vendor):
            measures[f"{side.label}: {call} loop"] = functools.partial(bench.queue, side, vendor, "queue_loop", n)
    figure.compare_all(figure.measure_in_rounds(measures), limit, {"ours: mailer.send_mail() loop": 0.8})


def figure_bulk(bench: Bench, vendor: str) -> None:
    """Queue N emails in one ``DbBackend.send_messages`` call; the base is 2.3.2's."""
    n = bench.sizes.bulk
    figure = Figure(bench, f"3 queue bulk, {n:,}", vendor)
    old = bench.old
    if old is None:
        figure.row(f"django-mailer {OLD_VERSION}", "not available", note=bench.old_problem)
        return
    base = f"{old.label}: DbBackend.send_messages (base)"
    measures = {
        base: functools.partial(bench.queue, old, vendor, "queue_bulk", n),
        "ours: DbBackend.send_messages": functools.partial(bench.queue, bench.ours, vendor, "queue_bulk", n),
        "bare bulk_create of pre-rendered rows": functools.partial(bench.queue, bench.bare, vendor, "queue_bulk", n),
    }
    post_office = bench.post_office
    if post_office is not None and post_office.runs_on(vendor):
        what = f"{post_office.label}: mail.send_many()"
        measures[what] = functools.partial(bench.queue, post_office, vendor, "queue_bulk", n)
    figure.compare_all(figure.measure_in_rounds(measures), base, {"ours: DbBackend.send_messages": 1.0})


# Figure 4 ------------------------------------------------------------------


def figure_scale(bench: Bench, vendor: str) -> None:
    """Drain a small and a large queue: the time per message stays flat, and so does memory."""
    sizes = list(bench.sizes.scale)
    if bench.args.huge and vendor == "postgresql":
        sizes.append(bench.sizes.huge)
    figure = Figure(bench, "4 drain scale", vendor)
    first: Run | None = None
    for n in sizes:
        run = figure.measure(f"ours: drain {n:,}", functools.partial(bench.drain, bench.ours, vendor, n))
        if run is None:
            continue
        memory = f"RSS +{run.rss_growth / 2**20:.1f} MB" if run.rss_growth is not None else "RSS not measurable"
        note = f"{run.describe()}; {memory}"
        per_message = f"{run.ms_per_message:.2f} ms/msg"
        if first is None:
            first = run
            figure.row(f"ours: drain {n:,}", per_message, "1.00x", note=note)
            continue
        ratio = run.ms_per_message / first.ms_per_message
        figure.row(f"ours: drain {n:,}", per_message, f"{ratio:.2f}x", "<= 1.2x", judge(ratio, None, 1.2, run.ok), note)
        if run.rss_growth is not None:
            megabytes = run.rss_growth / 2**20
            figure.row(
                f"ours: drain {n:,}, RSS growth",
                f"{megabytes:.1f} MB",
                "",
                "<= 30 MB",
                judge(megabytes, None, 30, True),
            )


# Figure 5 ------------------------------------------------------------------


def connections_request(bench: Bench) -> tuple[tuple[str, ...], dict, str] | None:
    """How to ask ours for several delivery connections, if it can do it yet: option, else setting."""
    count = bench.sizes.connections
    if bench.capabilities.get("connections_option"):
        return ("--connections", str(count)), {}, f"send_mail --connections {count}"
    if bench.capabilities.get("connections_setting"):
        return (), {"MAILER_DELIVERY_CONNECTIONS": count}, f"MAILER_DELIVERY_CONNECTIONS={count}"
    return None


def figure_parallel(bench: Bench, vendor: str) -> None:
    """A slow mail server: several processes, or several connections, against one."""
    n, delay, processes = bench.sizes.parallel, bench.sizes.delay, bench.sizes.processes
    figure = Figure(bench, f"5 sink {delay * 1000:.0f} ms/msg, {n:,}", vendor)
    no_lock = {"MAILER_USE_FILE_LOCK": False}
    parallel_limits(bench, figure)
    sides: list[tuple[Side, float | None]] = [(bench.ours, 3.6)]
    if bench.old is not None and bench.old.runs_on(vendor):
        sides.append((bench.old, None))
    for side, goal in sides:
        one = figure.measure(
            f"{side.label}: 1 process", functools.partial(bench.drain, side, vendor, n, 1, delay, no_lock)
        )
        if one is None:
            continue
        figure.base(f"{side.label}: 1 process, 1 connection", one)
        many = figure.measure(
            f"{side.label}: {processes} processes",
            functools.partial(bench.drain, side, vendor, n, processes, delay, no_lock),
        )
        if many:
            at_once = f"peak {many.peak_in_flight} at the sink at once"
            figure.compare(f"{side.label}: {processes} send_mail processes", many, one, at_least=goal, note=at_once)
        if side is bench.ours:
            several_connections(bench, figure, one, no_lock)


def parallel_limits(bench: Bench, figure: Figure) -> None:
    """Django's SMTP backend sending the same messages without a queue: over one connection, from several
    processes, and over several connections (threads) of one process. What no queue can beat on this machine.

    And as many processes as that process has threads: where they do better than the threads, what holds the
    threads back is their sharing one interpreter, not the machine or the mail server.
    """
    sizes = bench.sizes
    send = functools.partial(bench.send_directly, "django_send", sizes.parallel, sizes.delay)
    base = "Django SMTP backend, no queue: 1 connection"
    one = figure.measure(base, send)
    if one is None:
        return
    figure.base(base, one)
    for what, many in (
        (f"Django SMTP backend, no queue: {sizes.processes} processes (limit)", {"processes": sizes.processes}),
        (
            f"Django SMTP backend, no queue: 1 process, {sizes.connections} threads (limit)",
            {"connections": sizes.connections},
        ),
        (f"Django SMTP backend, no queue: {sizes.connections} processes", {"processes": sizes.connections}),
    ):
        run = figure.measure(what, functools.partial(send, **many))
        if run:
            figure.compare(what, run, one, note=f"peak {run.peak_in_flight} at the sink at once")


def several_connections(bench: Bench, figure: Figure, one: Run, no_lock: dict) -> None:
    """Ours, one process with several delivery connections, against the same process with one."""
    what = f"ours: 1 process, {bench.sizes.connections} connections"
    request = connections_request(bench)
    if request is None:
        figure.row(what, "not available", goal=">= 6.0x", note="no --connections option or MAILER_DELIVERY_CONNECTIONS")
        return
    args, settings, how = request
    sizes, vendor = bench.sizes, figure.vendor
    run = figure.measure(
        what, lambda: bench.drain(bench.ours, vendor, sizes.parallel, 1, sizes.delay, {**no_lock, **settings}, args)
    )
    if run:
        figure.compare(what, run, one, at_least=6.0, note=f"{how}; peak {run.peak_in_flight} at the sink at once")


# Figure 6 ------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was really measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def wait_until_listening(bench: Bench, database: Database, timeout: float) -> bool:
    """Wait until a session on ``database`` has run LISTEN (as the server sees it) and the trigger is there."""
    server = bench.databases.servers["postgresql"]
    listening = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'LISTEN%%'"
        " AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'django_mailer_message_notify_trigger')"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.query(listening, [database.name], database.name)[0][0]:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def running_command(bench: Bench, side: Side, database: Database, command: str, settings: dict) -> Iterator[Path]:
    """``manage.py command`` running in the background, stopped with SIGTERM at the end; yields its output file."""
    output = bench.runner.site / f"{command}-{side.key}-{bench.tag()}.txt"
    with open(output, "w") as out:
        process = subprocess.Popen(
            [side.python, str(bench.runner.site / "manage.py"), command],
            env=bench.runner.environment(side, database, settings, {}),
            cwd=bench.runner.site,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield output
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def commit_to_arrival(bench: Bench, side: Side, n: int) -> tuple[list[float], Delivery]:
    """Latencies (seconds) of ``n`` messages queued one at a time while ``runmailer_pg`` runs.

    The worker's beat (``MAILER_EMPTY_QUEUE_SLEEP``) is 30 s, so only its
    LISTEN can make a message arrive within milliseconds.
    """
    settings = {"MAILER_EMPTY_QUEUE_SLEEP": 30}
    with (
        bench.databases.fresh(side, "postgresql") as database,
        running_command(bench, side, database, "runmailer_pg", settings) as output,
    ):
        if not wait_until_listening(bench, database, 60):
            raise ChildFailed(f"{side.label} runmailer_pg did not LISTEN within 60 s{tail(output)}")
        # One message first: it shows the worker listens, and pays its one-off costs.
        bench.sink.reset()
        bench.runner.run(side, "produce", database, timeout=60, n=1, tag=bench.tag(), interval=0)
        if not bench.sink.wait_for(1, 45):
            raise ChildFailed(f"{side.label} runmailer_pg delivered nothing in 45 s{tail(output)}")
        bench.sink.reset()
        tag = bench.tag()
        interval = bench.sizes.interval
        produced = bench.runner.run(side, "produce", database, timeout=60 + n * 0.2, n=n, tag=tag, interval=interval)
        bench.sink.wait_for(n, 60)
        arrivals = bench.sink.arrivals()
        delivery = bench.sink.delivery(tag, n)
    commits = produced["commits"]
    return [arrivals[key] - committed for key, committed in commits.items() if key in arrivals], delivery


def figure_latency(bench: Bench, vendor: str) -> None:
    """``runmailer_pg``: from commit to arrival, ours against 2.3.2's in the same run."""
    n = bench.sizes.latency
    figure = Figure(bench, f"6 runmailer_pg, {n:,}", vendor)
    what = "commit to arrival p50 / p99"
    base: tuple[float, float] | None = None
    for side in (bench.old, bench.ours):
        if side is None:
            continue
        if side is bench.ours and not bench.capabilities.get("runmailer_pg"):
            figure.row(f"ours: {what}", "not available", goal="<= 2.3.2's", note="no runmailer_pg command")
            continue
        outcome = figure.measure(side.label, functools.partial(commit_to_arrival, bench, side, n))
        if outcome is None:
            continue
        latencies, delivery = outcome
        if not latencies:
            figure.row(f"{side.label}: {what}", "nothing arrived", verdict="FAIL", note=delivery.describe())
            continue
        p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
        result = f"{p50:.1f} / {p99:.1f} ms"
        if side is bench.old:
            base = (p50, p99)
            figure.row(f"{side.label}: {what}", result, "1.00x", note=delivery.describe())
        elif base is None:
            figure.row(f"ours: {what}", result, "", "<= 2.3.2's", note=delivery.describe())
        else:
            ratio = f"{p50 / base[0]:.2f}x / {p99 / base[1]:.2f}x"
            ok = p50 <= base[0] and p99 <= base[1] and delivery.exactly_once
            figure.row(f"ours: {what}", result, ratio, "<= 2.3.2's", "PASS" if ok else "FAIL", delivery.describe())


# ===========================================================================
# The run: figures, the table, the context it was measured in.
# ===========================================================================

FIGURES: dict[str, tuple[Callable[[Bench, str], None], tuple[str, ...], tuple[str, ...]]] = {
    # name: (function, vendors by default, vendors it can run on)
    "drain": (figure_drain, ("sqlite", "postgresql"), VENDORS),
    "queue": (figure_queue, ("sqlite", "postgresql"), VENDORS),
    "bulk": (figure_bulk, ("sqlite", "postgresql"), VENDORS),
    "scale": (figure_scale, ("sqlite", "postgresql"), VENDORS),
    "parallel": (figure_parallel, ("postgresql", "mysql"), ("postgresql", "mysql")),
    "latency": (figure_latency, ("postgresql",), ("postgresql",)),
}
FIGURE_NUMBERS = {str(number): name for number, name in enumerate(FIGURES, start=1)}


def code_fingerprint() -> str:
    """A short hash of mailer/'s Python files: which code was measured (it may change during a run)."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "mailer").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "mailer"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout
    except OSError:
        return "no git"
    changed = len(dirty.splitlines())
    return f"git {head}" + (f" + {changed} uncommitted file(s) in mailer/" if changed else "")


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(rows: list[Row]) -> None:
    headers = Row("figure", "db", "measured", "result", "ratio", "goal", "verdict", "note")
    columns = ["figure", "db", "what", "result", "ratio", "goal", "verdict", "note"]
    widths = {c: max(len(getattr(r, c)) for r in [headers, *rows]) for c in columns[:-1]}
    previous = None
    for row in [headers, *rows]:
        if previous is not None and (row.figure, row.db) != (previous.figure, previous.db):
            print()
        line = "  ".join(getattr(row, c).ljust(widths[c]) for c in columns[:-1]) + "  " + row.note
        print(line.rstrip())
        previous = row


def print_context(bench: Bench, started: float, fingerprint: str, load_before: str) -> None:
    """What was measured, where and when: the figures mean little without it."""
    ours = bench.capabilities
    now_fingerprint = code_fingerprint()
    changed = "" if now_fingerprint == fingerprint else f", CHANGED during the run to {now_fingerprint}"
    print()
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} in {time.time() - started:.0f} s")
    print(f"  on {os.cpu_count()} CPUs, load average before {load_before}, after {load_average()}")
    print(f"ours: {ours.get('mailer', '?')} {ours.get('version', '')}, {git_state()}, code {fingerprint}{changed}")
    print(f"  Python {ours.get('python', '?')}, Django {ours.get('django', '?')}")
    for side in (bench.old, bench.post_office):
        if side is not None:
            print(f"{side.label}: {side.python}" + (f" ({side.note})" if side.note else ""))
    for problem in bench.problems:
        print(problem)
    for (key, vendor), description in sorted(bench.databases.descriptions.items(), key=lambda item: item[0][::-1]):
        print(f"database {vendor:<10} {key:<5} {description}")
    stats = bench.sink.stats()
    if stats["received"]:
        print(f"messages: {stats['average_size']:,} bytes as sent (2 KB body), to aiosmtpd on 127.0.0.1 (own process)")
    print("Caveats: a shared 2-core machine (database servers, the sink and other sessions on it): seconds vary")
    print("by 10-20 % between runs, ratios measured back to back much less; --repeat N keeps the fastest of N")
    print("(figures 1-3). Timings start after Django setup and the database connection, in each side's process.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run of every figure")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated figures: " + ", ".join(f"{n}={name}" for n, name in FIGURE_NUMBERS.items()),
    )
    parser.add_argument(
        "--db", default="", help="comma-separated vendors: sqlite, postgresql, mysql (default: each figure's own)"
    )
    parser.add_argument("--drain", type=int, help="messages drained in figure 1 (default 5,000)")
    parser.add_argument("--queue", type=int, help="messages queued in figures 2 and 3 (default 3,000)")
    parser.add_argument("--scale", help="comma-separated queue sizes for figure 4 (default 3000,30000)")
    parser.add_argument("--huge", action="store_true", help="figure 4 also with 100,000 messages on PostgreSQL")
    parser.add_argument("--parallel", type=int, help="messages in figure 5 (default 1,000)")
    parser.add_argument("--latency", type=int, help="messages in figure 6 (default 500)")
    parser.add_argument(
        "--delay", type=float, help="milliseconds the sink takes over each message in figure 5 (default 20)"
    )
    parser.add_argument(
        "--no-post-office", dest="post_office", action="store_false", help="leave django-post-office out"
    )
    parser.add_argument(
        "--pg-prepared",
        action="store_true",
        help="PostgreSQL with server-side binding and prepared statements, for every side (default: Django's own)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="figures 1-3: N runs of each side, taking turns; the fastest counts"
    )
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "mailer-bench"),
        help="where the virtualenvs of the baselines are kept",
    )
    return parser.parse_args(argv)  # fmt: skip


def chosen_sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.drain:
        changes["drain"] = args.drain
    if args.queue:
        changes.update(queue=args.queue, bulk=args.queue)
    if args.scale:
        changes["scale"] = tuple(int(n) for n in args.scale.split(","))
    if args.parallel:
        changes["parallel"] = args.parallel
    if args.latency:
        changes["latency"] = args.latency
    if args.delay is not None:
        changes["delay"] = args.delay / 1000
    return replace(sizes, **changes)


def chosen_figures(args: argparse.Namespace) -> list[str]:
    names = [FIGURE_NUMBERS.get(name.strip(), name.strip()) for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}: choose among {', '.join(FIGURES)} or 1-{len(FIGURES)}")
    return [name for name in FIGURES if name in names] if names else list(FIGURES)


def chosen_vendors(args: argparse.Namespace, figure: str) -> list[str]:
    _function, default, possible = FIGURES[figure]
    asked = [vendor.strip() for vendor in args.db.split(",") if vendor.strip()]
    for vendor in asked:
        if vendor not in VENDORS:
            raise SystemExit(f"unknown database {vendor!r}: choose among {', '.join(VENDORS)}")
    return [vendor for vendor in asked if vendor in possible] if asked else list(default)


def prepare_sides(bench: Bench, figures: list[str]) -> None:
    """Install the baselines (or say why not) and ask ours what it can do."""
    cache = Path(bench.args.cache)
    try:
        bench.old = old_mailer_side(cache)
    except Exception as exc:
        bench.old_problem = str(exc).splitlines()[0]
        bench.problems.append(f"django-mailer {OLD_VERSION}: not available ({bench.old_problem})")
    if bench.args.post_office and {"drain", "queue", "bulk"} & set(figures):
        try:
            bench.post_office = post_office_side(cache)
        except Exception as exc:
            bench.problems.append(f"django-post-office: not available ({str(exc).splitlines()[0]})")
    bench.capabilities = bench.runner.run(bench.ours, "capabilities", None, timeout=60)
    if Path(bench.capabilities["mailer"]).resolve() != (REPO_ROOT / "mailer").resolve():
        raise SystemExit(f"ours would run from {bench.capabilities['mailer']}, not from this checkout")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sizes = chosen_sizes(args)
    figures = chosen_figures(args)
    started, fingerprint, load_before = time.time(), code_fingerprint(), load_average()
    with tempfile.TemporaryDirectory(prefix="mailer-speed-") as directory:
        site = Path(directory)
        write_site(site)
        sink = Sink()
        bench = Bench(args, sizes, site, sink)
        try:
            prepare_sides(bench, figures)
            for name in figures:
                function = FIGURES[name][0]
                for vendor in chosen_vendors(args, name):
                    print(f"figure {name} on {vendor} ...", file=sys.stderr, flush=True)
                    figure_started = time.monotonic()
                    problem = bench.databases.unavailable(vendor)
                    if problem:
                        bench.add(Row(name, vendor, "-", "not measurable", note=f"server unreachable: {problem}"))
                        continue
                    function(bench, vendor)
                    print(f"  ({time.monotonic() - figure_started:.0f} s)", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("interrupted: the figures so far", file=sys.stderr)
        finally:
            bench.databases.drop_all()
            print()
            print_table(bench.rows)
            print_context(bench, started, fingerprint, load_before)
            sink.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        main(sys.argv[1:])
