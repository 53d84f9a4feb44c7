"""Benchmark: memory and time to queue, send and log one email with a large attachment.

Requirement: "a 25 MB attachment queues, sends and logs without holding more
than a few copies of it in memory". This script measures how many copies each
step holds, as a ratio against a baseline that does the least any Django
site must do to send that email: render it and hand it to ``smtplib``.

Run it by hand from the repository root::

    python benchmarks/large_message.py [--size-mb 25] [--repeat 3] [--where [SIZE_MB]] [--db sqlite]

Phases, run in this order in one process:

1. ``baseline``: render the ``EmailMessage`` the way Django's SMTP backend
   does and ``smtplib.SMTP().sendmail()`` it: every copy made here (MIME
   rendering, base64, smtplib's dot-quoting) is one the queue cannot avoid;
2. ``queue``: ``Message.for_email(email).save()``, what ``mailer.send_mail``
   and ``DbBackend`` do: render once to validate, encode to JSON, INSERT;
3. ``send+log``: ``mailer.engine.send_all()``: read the row, decode it, send
   it through Django's SMTP backend, write the ``MessageLog`` row, delete the
   queued row.

Each phase is measured twice:

- with ``tracemalloc`` on (one frame, little overhead): the peak of traced
  Python memory during the phase, above what was traced when it started;
- with ``tracemalloc`` off, ``--repeat`` times: wall time (the best run) and
  the peak resident set size above the RSS when the phase started (the worst
  run). ``getrusage().ru_maxrss`` is the process's high-water mark since it
  started, so a phase lower than an earlier one would show nothing; Linux's
  equivalent ``VmHWM`` (/proc/self/status) is used instead, reset before
  each phase by writing 5 to ``/proc/self/clear_refs``. Where that cannot
  be done the column is left out. RSS also counts memory that Python does not trace (SQLite's own copy
  of a bound parameter, the database driver's buffers), but the allocator
  may keep freed memory and reuse it, so it can read lower than tracemalloc.

Figures are printed as multiples of the attachment size and as ratios to the
baseline, because the machines that run this are shared and noisy: absolute
seconds and megabytes vary from run to run, ratios much less.

The SMTP sink runs in a separate process (aiosmtpd, a handler that counts the
bytes and discards them), so its buffers are not in this process's figures.
The database is a SQLite file in a temporary directory, unless ``--db`` names
a server (see ``database_settings``).

``--where [SIZE_MB]`` then shows where the memory goes, with an attachment of
SIZE_MB (default 2; the sites scale with it, and a profile hook makes these
runs slow): for each phase, the innermost calls responsible for its highest
points, including temporaries inside C functions that no snapshot can see
(``ProbeHook``), and a tracemalloc snapshot at its highest point visible
between calls, compared with one from its start, by line and by traceback
(``SnapshotHook``).
"""

import argparse
import gc
import multiprocessing
import os
import smtplib
import socket
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

# Measure the working tree, not whatever copy of mailer an environment installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MB = 1024 * 1024
FROM = "sender@example.com"
TO = ["recipient@example.com"]


# The SMTP sink, in its own process ---------------------------------------


class CountingHandler:
    """aiosmtpd handler: accept every message, report its size, keep nothing.

    aiosmtpd itself buffers the whole DATA before calling ``handle_DATA``;
    that is why it runs in another process.
    """

    def __init__(self, sizes: "multiprocessing.Queue") -> None:
        self.sizes = sizes

    async def handle_DATA(self, server, session, envelope):
        self.sizes.put(len(envelope.original_content))
        envelope.original_content = envelope.content = None
        return "250 Message accepted for delivery"


def run_sink(ready: "multiprocessing.Queue", sizes: "multiprocessing.Queue", stop: "multiprocessing.Event") -> None:
    """Serve SMTP on 127.0.0.1 until ``stop`` is set; put the port on ``ready``.

    aiosmtpd refuses DATA over 32 MiB by default (``data_size_limit``); None
    lifts the limit, since base64 makes a 25 MB attachment 34 MB on the wire.
    The idle timeout is raised so that the slow ``--where`` runs are not cut off.
    """
    from aiosmtpd.controller import Controller

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(CountingHandler(sizes), hostname="127.0.0.1", port=port, data_size_limit=None, timeout=3600)
    controller.start()
    ready.put(port)
    stop.wait()
    controller.stop()


class Sink:
    """Start and stop the sink process; read the sizes of the messages it received."""

    def __init__(self) -> None:
        # spawn, not fork: the child starts clean, without a copy of this process.
        context = multiprocessing.get_context("spawn")
        ready, self.sizes, self.stop_event = context.Queue(), context.Queue(), context.Event()
        self.process = context.Process(target=run_sink, args=(ready, self.sizes, self.stop_event), daemon=True)
        self.process.start()
        self.host = "127.0.0.1"
        self.port = ready.get(timeout=30)

    def received(self) -> int:
        """Size in bytes of the next message the sink accepted (it has, once sendmail returned)."""
        return self.sizes.get(timeout=30)

    def stop(self) -> None:
        self.stop_event.set()
        self.process.join(timeout=10)


# Django, configured in code ---------------------------------------------


def database_settings(vendor: str, tmp: str) -> dict:
    """SQLite file in ``tmp``; or a server named as for the test suite.

    For ``postgresql`` and ``mysql`` the ``MAILER_TEST_DB_HOST``, ``_PORT``,
    ``_USER``, ``_PASSWORD`` and ``_NAME`` variables apply (defaults:
    127.0.0.1, the vendor's port, mailer/mailer/mailer). The benchmark creates
    and then drops its own database, ``test_mailer_benchmark``, so it leaves
    no tables behind and does not collide with a test run.
    """
    if vendor == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(tmp, "benchmark.sqlite3")}
    engines = {"postgresql": "django.db.backends.postgresql", "mysql": "django.db.backends.mysql"}
    ports = {"postgresql": "5432", "mysql": "3306"}
    env = os.environ.get
    return {
        "ENGINE": engines[vendor],
        "HOST": env("MAILER_TEST_DB_HOST", "127.0.0.1"),
        "PORT": env("MAILER_TEST_DB_PORT", ports[vendor]),
        "USER": env("MAILER_TEST_DB_USER", "mailer"),
        "PASSWORD": env("MAILER_TEST_DB_PASSWORD", "mailer"),
        "NAME": env("MAILER_TEST_DB_NAME", "mailer"),
        "TEST": {"NAME": "test_mailer_benchmark"},
    }


def configure_django(vendor: str, tmp: str, sink: Sink) -> None:
    """Settings as a site would have them, delivering through Django's SMTP backend to the sink.

    DEBUG stays False: with DEBUG on, Django keeps every query with its
    parameters in ``connection.queries``, another copy of the message.
    """
    import django
    from django.conf import settings

    delivery: dict = {}
    if django.VERSION >= (6, 1):
        delivery["MAILERS"] = {
            "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
            "smtp": {
                "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
                "OPTIONS": {"host": sink.host, "port": sink.port, "timeout": 120},
            },
        }
    else:
        delivery.update(
            EMAIL_BACKEND="mailer.backend.DbBackend",
            MAILER_EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST=sink.host,
            EMAIL_PORT=sink.port,
            EMAIL_TIMEOUT=120,
        )
    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmark",
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "mailer"],
        DATABASES={"default": database_settings(vendor, tmp)},
        MAILER_LOCK_PATH=os.path.join(tmp, "send_mail"),
        **delivery,
    )
    django.setup()


def prepare_database(vendor: str) -> None:
    from django.core.management import call_command
    from django.db import connection

    if vendor == "sqlite":
        call_command("migrate", verbosity=0)
    else:
        connection.creation.create_test_db(verbosity=0, autoclobber=True)  # runs migrate


def value_size_limit() -> str:
    """What limits the size of one stored value on the database in use, as the server reports it."""
    from django.db import connection

    vendor = connection.vendor
    if vendor == "sqlite":
        import sqlite3

        connection.ensure_connection()
        if hasattr(connection.connection, "getlimit"):  # Python >= 3.11
            limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
            return f"SQLite {sqlite3.sqlite_version}: SQLITE_LIMIT_LENGTH {limit:,} bytes"
        return f"SQLite {sqlite3.sqlite_version}: SQLITE_MAX_LENGTH (default 1,000,000,000 bytes)"
    if vendor == "mysql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT VERSION(), @@max_allowed_packet")
            version, packet = cursor.fetchone()
        return f"{version}: max_allowed_packet {packet:,} bytes (a statement, so the whole INSERT)"
    if vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            (version,) = cursor.fetchone()
        return f"PostgreSQL {version}: a text value is limited to 1 GB"
    return vendor


def drop_database(vendor: str) -> None:
    from django.conf import settings
    from django.db import connection

    if vendor != "sqlite":
        connection.creation.destroy_test_db(settings.DATABASES["default"]["NAME"], verbosity=0)


# The phases ---------------------------------------------------------------


def make_email(payload: bytes):
    """The email every phase sends: a short body and the one large attachment (not copied)."""
    from django.core.mail import EmailMessage

    return EmailMessage(
        subject="Large attachment",
        body="See the attachment.",
        from_email=FROM,
        to=TO,
        attachments=[("data.bin", payload, "application/octet-stream")],
    )


def render_like_smtp_backend(message) -> bytes:
    """Render ``message`` to bytes exactly as the SMTP backend of this Django version does.

    Django 6.0 and later render with the modern ``email.policy.SMTP``, which
    ``EmailMessage.message()`` accepts from then on; 5.2 renders with the
    legacy API and asks for CRLF line ends.
    """
    import email.policy
    import inspect

    if "policy" in inspect.signature(message.message).parameters:
        return message.message(policy=email.policy.SMTP).as_bytes()
    return message.message().as_bytes(linesep="\r\n")


def phase_baseline(payload: bytes, sink: Sink) -> None:
    email = make_email(payload)
    data = render_like_smtp_backend(email)
    with smtplib.SMTP(sink.host, sink.port, timeout=120) as smtp:
        smtp.sendmail(FROM, TO, data)


def phase_queue(payload: bytes, sink: Sink) -> None:
    from mailer.models import Message

    Message.for_email(make_email(payload)).save()


def phase_send(payload: bytes, sink: Sink) -> None:
    from mailer.engine import send_all

    counts = send_all()
    if counts is None or counts["sent"] != 1:
        raise RuntimeError(f"send_all() did not send the message: {counts}")


PHASES = [
    ("baseline", "render + smtplib.sendmail", phase_baseline),
    ("queue", "Message.for_email().save()", phase_queue),
    ("send+log", "engine.send_all()", phase_send),
]
SENDING_PHASES = {"baseline", "send+log"}


def tidy_up() -> None:
    """Between repeats: empty the log, so the database does not grow by one large row a run."""
    from mailer.models import Message, MessageLog

    if Message.objects.exists():
        raise RuntimeError("a message is still queued after send_all()")
    MessageLog.objects.all().delete()


# Measuring ---------------------------------------------------------------

CLEAR_REFS = "/proc/self/clear_refs"


def can_reset_rss_peak() -> bool:
    """Tell whether the RSS high-water mark can be reset (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_rss_peak() -> None:
    with open(CLEAR_REFS, "w", encoding="ascii") as f:
        f.write("5")


def rss_and_peak() -> tuple[int, int]:
    """Current RSS and its high-water mark since the last reset, in bytes (/proc/self/status)."""
    values = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kb, _unit = line.split()
                values[name] = int(kb) * 1024
    return values["VmRSS:"], values["VmHWM:"]


@dataclass
class Figures:
    traced_peak: int = 0  # bytes above the start of the phase
    rss_peaks: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    sink_bytes: int = 0


def measure_traced(payload: bytes, sink: Sink, figures: dict[str, Figures]) -> None:
    """One run of every phase with tracemalloc on: peak traced memory above each phase's start.

    tracemalloc starts after the payload exists, so the attachment itself is
    not counted: a phase that holds one more copy of it shows 1.0x.
    """
    tracemalloc.start(1)
    try:
        for name, _label, phase in PHASES:
            gc.collect()
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            phase(payload, sink)
            _, peak = tracemalloc.get_traced_memory()
            figures[name].traced_peak = peak - start
            if name in SENDING_PHASES:
                figures[name].sink_bytes = sink.received()
    finally:
        tracemalloc.stop()
    tidy_up()


def measure_untraced(payload: bytes, sink: Sink, figures: dict[str, Figures], rss: bool) -> None:
    """One run of every phase with tracemalloc off: wall time and RSS peak above each phase's start."""
    for name, _label, phase in PHASES:
        gc.collect()
        if rss:
            reset_rss_peak()
            start_rss, _ = rss_and_peak()
        started = time.perf_counter()
        phase(payload, sink)
        figures[name].seconds.append(time.perf_counter() - started)
        if rss:
            _, peak_rss = rss_and_peak()
            figures[name].rss_peaks.append(peak_rss - start_rss)
        if name in SENDING_PHASES:
            sink.received()
    tidy_up()


@dataclass
class CallPeak:
    """A call during which traced memory rose high, higher than in any call it made."""

    level: int  # highest traced memory during the call, above the phase's start
    transient: int  # of which freed again before the call returned
    function: str
    caller: str  # the line that made the call
    project: str  # the mailer lines on the stack (else the innermost Django line)


@dataclass
class OpenCall:
    start: int
    high: int
    explained: int = 0  # the highest level a recorded call inside this one reached


class ProbeHook:
    """Profile hook: find which calls make each phase's highest points.

    tracemalloc gives a phase's peak but not what made it, and a snapshot
    shows only what is alive when it is taken; the highest points are often
    inside a C function (``json.dumps``'s encoder, ``base64``, a regex
    substitution) where no Python code runs to take one. So on every call
    and return this hook reads the traced memory and tracemalloc's peak
    since the previous event (then resets it), keeps the highest level
    reached inside each open call, and when a call returns records it if it
    freed a large temporary and reached a level that no call inside it,
    already recorded, reached: the innermost call responsible for that high
    point. It also notes the highest level seen between calls
    (``visible_max``), where ``SnapshotHook`` takes its snapshot.
    """

    def __init__(self, start: int, min_transient: int) -> None:
        self.start = start
        self.min_transient = min_transient
        self.visible_max = 0
        self.stack = [OpenCall(start, start)]
        self.calls: dict[tuple[str, str, str], CallPeak] = {}

    def __call__(self, frame, event, arg) -> None:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        self.visible_max = max(self.visible_max, current - self.start)
        top = self.stack[-1]
        top.high = max(top.high, peak)
        if event in ("call", "c_call"):
            self.stack.append(OpenCall(current, current))
        elif len(self.stack) > 1:  # return, c_return, c_exception
            done = self.stack.pop()
            parent = self.stack[-1]
            parent.high = max(parent.high, done.high)
            if done.high - current >= self.min_transient and done.high > done.explained:
                self.record(frame, event, arg, done.high, current)
                parent.explained = max(parent.explained, done.high)
            else:
                parent.explained = max(parent.explained, done.explained)

    def record(self, frame, event, arg, high: int, current: int) -> None:
        if event == "return":
            function = f"{short_path(frame.f_code.co_filename)}:{frame.f_code.co_name}"
            caller_frame = frame.f_back
        else:
            module = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__name__
            function = f"{module}.{getattr(arg, '__qualname__', repr(arg))}"
            caller_frame = frame
        caller = f"{short_path(caller_frame.f_code.co_filename)}:{caller_frame.f_lineno}" if caller_frame else "-"
        project = project_line(caller_frame)
        key = (function, caller, project)
        level = high - self.start
        if key not in self.calls or self.calls[key].level < level:
            self.calls[key] = CallPeak(level, high - current, function, caller, project)


class SnapshotHook:
    """Profile hook: snapshot tracemalloc when memory is back at the highest visible level.

    It looks only at returns (the cheapest place to catch the highest
    points); the snapshot's own memory is subtracted from the readings that
    follow, and a later, higher point replaces it.
    """

    def __init__(self, threshold: int, step: int) -> None:
        self.threshold = threshold
        self.step = step
        self.best = 0
        self.own = 0
        self.snapshot: tracemalloc.Snapshot | None = None

    def __call__(self, frame, event, arg) -> None:
        if event != "return" and event != "c_return":
            return
        current = tracemalloc.get_traced_memory()[0] - self.own
        if current < self.threshold or current < self.best + self.step:
            return
        self.snapshot = None
        self.own = 0
        before = tracemalloc.get_traced_memory()[0]
        self.snapshot = tracemalloc.take_snapshot()
        self.own = tracemalloc.get_traced_memory()[0] - before
        self.best = before


def project_line(frame) -> str:
    """The mailer lines on the stack of ``frame``, outermost first, else the innermost Django line.

    Of the frames inside ``mailer/codec.py`` (recursive, and many) only the
    outermost is kept: the call into the codec is what tells the places apart.
    """
    mailer_lines, django_line = [], ""
    while frame is not None:
        filename = frame.f_code.co_filename
        if f"{os.sep}mailer{os.sep}" in filename:
            mailer_lines.append((filename, f"{short_path(filename)}:{frame.f_lineno}"))
        elif not django_line and f"{os.sep}django{os.sep}" in filename:
            django_line = f"{short_path(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    if not mailer_lines:
        return django_line or "-"
    kept = []
    for filename, line in reversed(mailer_lines):
        if filename.endswith("codec.py") and kept and kept[-1][0].endswith("codec.py"):
            continue
        kept.append((filename, line))
    return " > ".join(line for _filename, line in kept)


def run_hooked(phase, payload: bytes, sink: Sink, name: str, hook) -> None:
    sys.setprofile(hook)
    try:
        phase(payload, sink)
    finally:
        sys.setprofile(None)
    if name in SENDING_PHASES:
        sink.received()


SNAPSHOT_FILTERS = [
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
]


def show_where(size: int, sink: Sink, top: int) -> None:
    """For each phase, print where the memory of its highest points comes from.

    Two more runs of the phases, with an attachment of ``size`` bytes (the
    sites scale with it; figures are again multiples of it). Both are slow,
    a Python profile hook sees every call: the first (one frame per
    allocation) runs ``ProbeHook``; the second (30 frames, five times slower
    again) takes a snapshot at the highest visible level and compares it
    with one from the phase's start, by line and by traceback.
    """
    if sys.version_info < (3, 11):
        print(
            "\nNote: before Python 3.11 a profile hook copies each frame's locals into a dict, which can keep"
            "\na local the code has deleted alive until that frame's next event; the peaks below may then"
            "\nbe higher than the measured ones above, which are the figures to trust."
        )
    payload = os.urandom(size)
    probes = {}
    tracemalloc.start(1)
    try:
        for name, _label, phase in PHASES:
            gc.collect()
            probes[name] = ProbeHook(tracemalloc.get_traced_memory()[0], min_transient=size // 4)
            run_hooked(phase, payload, sink, name, probes[name])
    finally:
        tracemalloc.stop()
    tidy_up()
    tracemalloc.start(30)
    try:
        for name, label, phase in PHASES:
            gc.collect()
            start_snapshot = tracemalloc.take_snapshot()
            start = tracemalloc.get_traced_memory()[0]
            probe = probes[name]
            hook = SnapshotHook(start + probe.visible_max - size // 20, step=size // 10)
            run_hooked(phase, payload, sink, name, hook)
            print_where(name, label, probe, hook, start_snapshot, start, size, top)
    finally:
        tracemalloc.stop()
    tidy_up()


def print_where(name, label, probe, hook, start_snapshot, start, size, top) -> None:
    def x(n: int) -> str:
        return f"{n / MB:6.1f} MB {n / size:5.2f}x"

    phase_high = max(entry.high for entry in probe.stack) - probe.start
    print(f"\n=== {name} ({label}), {size / MB:.1f} MB attachment ===")
    print(f"peak {x(phase_high)}; highest between calls {x(probe.visible_max)}")
    print("calls that make the high points (innermost responsible call; level reached, temporary part):")
    for call in sorted(probe.calls.values(), key=lambda c: c.level, reverse=True)[:top]:
        print(f"  {x(call.level)}  temp {x(call.transient)}  {call.function}")
        print(f"        called at {call.caller}, from {call.project}")
    if hook.snapshot is None:
        print("(no snapshot: the highest visible level was not reached again)")
        return
    at_peak = hook.snapshot.filter_traces(SNAPSHOT_FILTERS)
    at_start = start_snapshot.filter_traces(SNAPSHOT_FILTERS)
    print(f"alive at the highest visible point ({x(hook.best - start)}), allocated during the phase, by line:")
    for stat in at_peak.compare_to(at_start, "lineno")[:top]:
        if stat.size_diff < size // 50:
            break
        frame = stat.traceback[0]
        print(f"  {x(stat.size_diff)}  {short_path(frame.filename)}:{frame.lineno}")
    print("  the same by traceback (mailer and Django frames, then the allocating line):")
    for stat in at_peak.compare_to(at_start, "traceback")[:top]:
        if stat.size_diff < size // 10:
            break
        print(f"  {x(stat.size_diff)}  " + " > ".join(trim_traceback(stat.traceback)))


def short_path(filename: str) -> str:
    site_packages = [p + os.sep for p in sys.path if p and "site-packages" in p]
    for prefix in (*site_packages, str(REPO_ROOT) + os.sep):  # a virtualenv may sit inside the repository
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    if os.sep + "lib" + os.sep + "python" in filename:
        return "stdlib/" + filename.split(os.sep + "lib" + os.sep, 1)[1].split(os.sep, 1)[1]
    return filename


def trim_traceback(traceback: tracemalloc.Traceback) -> list[str]:
    """The mailer and Django frames of ``traceback`` and its innermost frame, oldest first."""
    frames = list(traceback)  # tracemalloc.Traceback is oldest first
    kept = [
        f"{short_path(f.filename)}:{f.lineno}"
        for f in frames[:-1]
        if f"{os.sep}mailer{os.sep}" in f.filename or f"{os.sep}django{os.sep}" in f.filename
    ]
    return kept + [f"{short_path(frames[-1].filename)}:{frames[-1].lineno}"]


# Report ------------------------------------------------------------------


def print_report(figures: dict[str, Figures], size: int, rss: bool, repeat: int) -> None:
    base = figures["baseline"]
    base_time = min(base.seconds)
    header = f"{'phase':<10} {'what':<28} {'peak MB':>8} {'x att.':>7} {'/ base':>7}"
    if rss:
        header += f" {'RSS MB':>8} {'x att.':>7} {'/ base':>7}"
    header += f" {'seconds':>8} {'/ base':>7}"
    print(header)
    print("-" * len(header))
    for name, label, _phase in PHASES:
        fig = figures[name]
        row = (
            f"{name:<10} {label:<28} {fig.traced_peak / MB:8.1f} {fig.traced_peak / size:7.2f} "
            f"{fig.traced_peak / base.traced_peak:7.2f}"
        )
        if rss:
            peak_rss, base_rss = max(fig.rss_peaks), max(base.rss_peaks)
            row += (
                f" {peak_rss / MB:8.1f} {peak_rss / size:7.2f} {peak_rss / base_rss if base_rss else float('nan'):7.2f}"
            )
        best = min(fig.seconds)
        row += f" {best:8.3f} {best / base_time:7.2f}"
        print(row)
    print()
    print("peak MB: tracemalloc peak above the phase's start; x att.: that over the attachment size;")
    print("/ base: that over the baseline phase's figure, measured in the same process.")
    if rss:
        print(f"RSS MB: peak resident set above the phase's start, worst of {repeat} untraced run(s).")
    print(f"seconds: best of {repeat} untraced run(s); spread of send+log: {spread(figures['send+log'].seconds)}.")
    sent = figures["send+log"].sink_bytes
    print(
        f"sink received: baseline {base.sink_bytes:,} bytes, send+log {sent:,} bytes "
        f"({sent / size:.2f}x the attachment on the wire)"
    )


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "one run"
    return f"{min(values):.3f}..{max(values):.3f} s, median {statistics.median(values):.3f} s"


def check_stored_row(size: int) -> None:
    """Queue and send once more, outside the measurements, and check the rows' sizes in the database."""
    from mailer.engine import send_all
    from mailer.models import Message, MessageLog

    message = Message.for_email(make_email(os.urandom(size)))
    message.save()
    queued = len(Message.objects.get(pk=message.pk).message_data)
    send_all()
    logged = MessageLog.objects.order_by("-pk").values_list("message_data", flat=True).first() or ""
    print(
        f"stored rows: Message.message_data {queued:,} chars, MessageLog.message_data {len(logged):,} chars "
        f"({queued / size:.2f}x the attachment)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=25, help="attachment size in MB (MiB); default 25")
    parser.add_argument("--repeat", type=int, default=3, help="untraced runs for timings and RSS; default 3")
    parser.add_argument(
        "--where",
        type=float,
        nargs="?",
        const=2,
        metavar="SIZE_MB",
        help="also show where each phase's memory goes, with an attachment of SIZE_MB (default 2: it is slow)",
    )
    parser.add_argument("--top", type=int, default=10, help="lines to show per phase with --where; default 10")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "mysql"], default="sqlite")
    args = parser.parse_args()
    size = int(args.size_mb * MB)

    sink = Sink()
    try:
        with tempfile.TemporaryDirectory(prefix="mailer-benchmark-") as tmp:
            configure_django(args.db, tmp, sink)
            prepare_database(args.db)
            try:
                run(args, size, sink)
            finally:
                drop_database(args.db)
    finally:
        sink.stop()


def run(args: argparse.Namespace, size: int, sink: Sink) -> None:
    import django
    from django.db import DatabaseError, connection

    import mailer

    print(
        f"mailer {mailer.__version__} ({short_path(mailer.__file__)}), Django {django.__version__}, "
        f"Python {sys.version.split()[0]}, database {connection.vendor}"
    )
    print(f"database limit: {value_size_limit()}")
    print(f"attachment: {size:,} bytes ({size / MB:.1f} MB) of random data\n")

    payload = os.urandom(size)
    figures = {name: Figures() for name, _label, _phase in PHASES}
    rss = can_reset_rss_peak()
    try:
        measure_untraced(payload, sink, figures, rss)  # also the warm-up (imports, first queries); its figures count
    except DatabaseError as exc:
        print(f"The database refused the message ({type(exc).__name__}: {exc}); the limit is above.")
        raise SystemExit(1) from None
    measure_traced(payload, sink, figures)
    for _ in range(args.repeat - 1):
        measure_untraced(payload, sink, figures, rss)
    print_report(figures, size, rss, args.repeat)
    check_stored_row(size)
    if args.where:
        show_where(int(args.where * MB), sink, args.top)


if __name__ == "__main__":
    main()
