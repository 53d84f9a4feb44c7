"""Rows in ``message_data`` are data, never code.

Anyone who can write to the queue table (an SQL injection elsewhere in the
site, a leaked database password, a restored backup from an untrusted place)
could otherwise turn a queued "email" into code run by the sending worker,
by the admin, or by anything that reads ``Message.email``. Legacy rows are
pickles, and unpickling runs whatever callables the pickle names, so:

- legacy rows (django-mailer 2.x's base64 pickle, and the raw protocol-0
  pickle of releases before 2.0) are read by a restricted unpickler that
  admits only the email classes of Django and the standard library and plain
  containers; anything else is refused;
- a refused row is not lost and not sent: it stays in the queue, deferred,
  with a failure log row that names what was refused;
- new rows are JSON, so nothing written from now on is ever unpickled.

Every malicious pickle here is built without running it (``pickle.dumps`` of
an object whose ``__reduce__`` names a callable only records the name; the
hand-made ones are bytes). Its payload is harmless but observable: it
creates a marker file or directory under the test's ``tmp_path``, so "no
code ran" is checked by the marker's absence, not assumed. A control test
runs each payload under plain ``pickle.loads`` in a child process, to prove
that it is live and that a refusal is not an accident of a malformed pickle.
"""

import base64
import builtins
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.message import EmailAttachment
from django.utils import timezone

import mailer
from mailer import engine
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    db_to_email,
    email_to_db,
)
from tests.test_admin import change_page, changelist
from tests.test_migrations import (  # noqa: F401 -- before_conversion is a fixture
    before_conversion,
    migrate_mailer,
    models_before_conversion,
)

pytestmark = pytest.mark.django_db

# A one-pixel GIF: real image bytes, including NUL and high bytes.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


# --------------------------------------------------------------------------
# Building malicious pickles without running them
# --------------------------------------------------------------------------


class Reduce:
    """Pickles as the call ``func(*args)``.

    ``pickle.dumps`` only writes the reference to ``func`` and the arguments;
    the call would happen in whoever unpickles it, which is exactly what a
    forged queue row relies on.
    """

    def __init__(self, func: Callable, args: tuple) -> None:
        self.func = func
        self.args = args

    def __reduce__(self):
        return self.func, self.args


def payload_code(marker: Path) -> str:
    """Python source that creates the marker file (and closes it: warnings are errors here)."""
    return f"with open({str(marker)!r}, 'w') as f: f.write('pwned')"


def exec_writing(marker: Path) -> Reduce:
    """``builtins.exec`` of code that writes the marker: arbitrary code, the worst case."""
    return Reduce(builtins.exec, (payload_code(marker),))


def mkdir_of(marker: Path) -> Reduce:
    """``os.mkdir`` (pickled as ``posix.mkdir``): an OS call with an attacker's argument."""
    return Reduce(os.mkdir, (str(marker),))


def subprocess_mkdir(marker: Path) -> Reduce:
    """``subprocess.call``: an attacker's command line."""
    return Reduce(subprocess.call, (["mkdir", str(marker)],))


def _unicode_op(text: str) -> bytes:
    """The protocol-4 opcode pushing ``text`` (SHORT_BINUNICODE, or BINUNICODE when long)."""
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def stack_global(module: str, name: str) -> bytes:
    """Push ``module``/``name`` and resolve them with STACK_GLOBAL.

    Since protocol 4 the standard unpickler resolves a dotted ``name`` by
    walking attributes, so a module that is rightly allowed can be a
    stepping stone to one that is not (``email.utils`` imports ``os``), and
    any function's ``__builtins__`` leads to ``exec``.
    """
    return _unicode_op(module) + _unicode_op(name) + pickle.STACK_GLOBAL


def call_with_one_arg(arg: str) -> bytes:
    """Call what is on the stack with the single argument ``arg`` (TUPLE1, REDUCE)."""
    return _unicode_op(arg) + pickle.TUPLE1 + pickle.REDUCE


PROTO_4 = pickle.PROTO + bytes([4])


def dotted_name_to_os_mkdir(marker: Path) -> bytes:
    """``email.utils`` is email machinery; ``email.utils`` + ``os.mkdir`` is ``os.mkdir``."""
    return PROTO_4 + stack_global("email.utils", "os.mkdir") + call_with_one_arg(str(marker)) + pickle.STOP


def dotted_name_to_exec_through_builtins(marker: Path) -> bytes:
    """From Django's own EmailMessage to ``exec``: ``__builtins__.get('exec')``, then call it.

    The second REDUCE calls an object the unpickler never looked up by name,
    so only refusing the dotted name itself stops it.
    """
    code = payload_code(marker)
    return (
        PROTO_4
        + stack_global("django.core.mail.message", "EmailMessage.__init__.__builtins__.get")
        + call_with_one_arg("exec")
        + call_with_one_arg(code)
        + pickle.STOP
    )


def _function_of_django_core_mail() -> str:
    """The name of a function defined in ``django.core.mail`` itself (it differs between Django versions).

    Its ``__globals__`` is that module's namespace, which holds
    ``import_string``. Found by introspection: nothing is called.
    """
    import types

    import django.core.mail

    namespace = vars(django.core.mail)
    for name, value in namespace.items():
        if isinstance(value, types.FunctionType) and value.__globals__ is namespace:
            return name
    raise AssertionError("django.core.mail defines no function")


def dotted_name_through_globals(marker: Path) -> bytes:
    """``<a function of django.core.mail>.__globals__.get('import_string')``, then ``os.mkdir`` through it.

    Every step after the first works on objects the unpickler never looked
    up by name.
    """
    return (
        PROTO_4
        + stack_global("django.core.mail", f"{_function_of_django_core_mail()}.__globals__.get")
        + call_with_one_arg("import_string")
        + call_with_one_arg("os.mkdir")
        + call_with_one_arg(str(marker))
        + pickle.STOP
    )


def function_of_django_mail_module(marker: Path) -> bytes:
    """A plain name in Django's mail package that is not an email class: ``django.core.mail.import_string``.

    An allow-list of modules, rather than of classes, would admit it, and it
    imports and returns anything (here ``os.mkdir``).
    """
    return (
        PROTO_4
        + stack_global("django.core.mail", "import_string")
        + call_with_one_arg("os.mkdir")
        + call_with_one_arg(str(marker))
        + pickle.STOP
    )


def dotted_global_protocol_2(marker: Path) -> bytes:
    """The same dotted walk written with the older GLOBAL opcode.

    The standard unpickler does not walk dots for protocols below 4, but a
    hand-written ``find_class`` that walks them itself would.
    """
    code = payload_code(marker)
    return (
        pickle.PROTO
        + bytes([2])
        + pickle.GLOBAL
        + b"django.core.mail.message\nEmailMessage.__init__.__builtins__.get\n"
        + pickle.BINUNICODE
        + struct.pack("<I", 4)
        + b"exec"
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.BINUNICODE
        + struct.pack("<I", len(code.encode()))
        + code.encode()
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


def inst_opcode(marker: Path) -> bytes:
    """Protocol 0's INST: ``i`` names a callable and calls it on the marked arguments.

    Plain text, like the rows of releases before 2.0.
    """
    return b"(V" + str(marker).encode("ascii") + b"\nios\nmkdir\n."


def obj_opcode(marker: Path) -> bytes:
    """Protocol 1's OBJ: a GLOBAL after the mark is called on what follows it."""
    path = str(marker).encode("ascii")
    return (
        pickle.MARK
        + pickle.GLOBAL
        + b"os\nmkdir\n"
        + pickle.BINUNICODE
        + struct.pack("<I", len(path))
        + path
        + pickle.OBJ
        + pickle.STOP
    )


def nested_in_header(payload: Callable[[Path], Reduce], protocol: int) -> Callable[[Path], bytes]:
    """A genuine EmailMessage whose ``extra_headers`` holds the payload: refusal must happen deep inside."""

    def build(marker: Path) -> bytes:
        email = EmailMessage(
            "Looks legitimate",
            "A body",
            "from@example.com",
            ["victim@example.com"],
            headers={"X-Trap": payload(marker)},  # type: ignore[dict-item]
        )
        return pickle.dumps(email, protocol=protocol)

    return build


def nested_in_attachment(payload: Callable[[Path], Reduce], protocol: int) -> Callable[[Path], bytes]:
    """A genuine EmailMultiAlternatives with the payload as an attachment's content."""

    def build(marker: Path) -> bytes:
        email = EmailMultiAlternatives("Invoice", "See attached", "from@example.com", ["victim@example.com"])
        email.attach_alternative("<p>See attached</p>", "text/html")
        # Set directly: attach() would look at the content.
        email.attachments = [EmailAttachment("invoice.txt", payload(marker), "text/plain")]  # type: ignore[arg-type]
        return pickle.dumps(email, protocol=protocol)

    return build


def reduce_pickle(payload: Callable[[Path], Reduce], protocol: int) -> Callable[[Path], bytes]:
    def build(marker: Path) -> bytes:
        return pickle.dumps(payload(marker), protocol=protocol)

    return build


def module_importing_tripwire(prefix: str, protocol: int) -> Callable[["TrapContext"], tuple[bytes, tuple[str, ...]]]:
    """A GLOBAL naming a module that writes the marker when it is imported.

    Importing is running code: an allow-list must be checked before the
    module is imported, not after. The module name starts with ``email`` so
    that a check on the prefix of the module name is caught out too.
    """

    def build(ctx: "TrapContext") -> tuple[bytes, tuple[str, ...]]:
        name = ctx.tripwire_module(prefix)
        if protocol == 0:
            data = b"c" + name.encode("ascii") + b"\nThing\n(tR."
        else:
            data = PROTO_4 + stack_global(name, "Thing") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP
        return data, (name,)

    return build


# --------------------------------------------------------------------------
# The catalogue of traps
# --------------------------------------------------------------------------

BASE64 = "base64"  # django-mailer 2.x: base64 of the pickle
RAW = "raw"  # before 2.0: the protocol-0 pickle text itself


@dataclass
class TrapContext:
    """What a trap needs from its test: where the marker goes, and a way to plant a module."""

    marker: Path
    modules_dir: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def tripwire_module(self, prefix: str) -> str:
        """Write an importable module that creates the marker on import; return its name."""
        name = f"{prefix}_{uuid.uuid4().hex}"
        self.modules_dir.mkdir(exist_ok=True)
        (self.modules_dir / f"{name}.py").write_text(f"{payload_code(self.marker)}\n\n\nclass Thing:\n    pass\n")
        self.monkeypatch.syspath_prepend(str(self.modules_dir))
        self.request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name


@dataclass(frozen=True)
class Trap:
    """One malicious pickle: how to build it, which words the refusal must mention, how it may be stored."""

    id: str
    build: Callable[[TrapContext], tuple[bytes, tuple[str, ...]]]
    storages: tuple[str, ...] = (BASE64,)
    # False: plain pickle refuses it, but an unpickler whose find_class
    # walks dotted names itself runs it.
    live_under_plain_pickle: bool = True


def simple(build: Callable[[Path], bytes], *evidence: str) -> Callable[[TrapContext], tuple[bytes, tuple[str, ...]]]:
    """Adapt a builder that needs only the marker path; its refusal must mention one of ``evidence``."""
    return lambda ctx: (build(ctx.marker), evidence)


PAYLOADS = {
    # name: (payload, what the refusal should mention)
    "exec": (exec_writing, ("exec",)),
    "os.mkdir": (mkdir_of, ("mkdir",)),
    "subprocess.call": (subprocess_mkdir, ("subprocess",)),
}

TRAPS = [
    *(
        Trap(
            f"{name}-protocol{protocol}",
            simple(reduce_pickle(payload, protocol), *evidence),
            (BASE64, RAW) if protocol == 0 else (BASE64,),
        )
        for name, (payload, evidence) in PAYLOADS.items()
        for protocol in (0, 2, 4, 5)
    ),
    Trap("exec-in-header-protocol4", simple(nested_in_header(exec_writing, 4), "exec")),
    Trap("mkdir-in-header-protocol0", simple(nested_in_header(mkdir_of, 0), "mkdir"), (BASE64, RAW)),
    Trap("exec-in-attachment-protocol5", simple(nested_in_attachment(exec_writing, 5), "exec")),
    Trap("subprocess-in-attachment-protocol2", simple(nested_in_attachment(subprocess_mkdir, 2), "subprocess")),
    Trap("dotted-email.utils-os.mkdir", simple(dotted_name_to_os_mkdir, "os.mkdir", "mkdir")),
    Trap("dotted-EmailMessage-builtins-exec", simple(dotted_name_to_exec_through_builtins, "__builtins__")),
    Trap("dotted-django.core.mail-globals", simple(dotted_name_through_globals, "__globals__")),
    Trap("django.core.mail-import_string", simple(function_of_django_mail_module, "import_string")),
    Trap("dotted-GLOBAL-protocol2", simple(dotted_global_protocol_2, "__builtins__"), live_under_plain_pickle=False),
    Trap("INST-opcode", simple(inst_opcode, "mkdir"), (BASE64, RAW)),
    Trap("OBJ-opcode", simple(obj_opcode, "mkdir")),
    Trap("import-of-unlisted-module-protocol4", module_importing_tripwire("email_tripwire", 4)),
    Trap("import-of-unlisted-module-protocol0", module_importing_tripwire("email_tripwire", 0), (BASE64, RAW)),
]

TRAP_PARAMS = [pytest.param((trap, storage), id=f"{trap.id}-{storage}") for trap in TRAPS for storage in trap.storages]


def store(data: bytes, storage: str) -> str:
    """Encode a pickle as it sits in ``message_data``."""
    if storage == BASE64:
        return base64.encodebytes(data).decode("ascii")
    # The raw rows of releases before 2.0 are protocol-0 text.
    assert data.isascii(), "a raw row must be the ASCII text of a protocol-0 pickle"
    return data.decode("latin-1")


@dataclass
class Armed:
    """A trap ready for a test: the row's text, the marker, and what the refusal should name."""

    data: str
    pickle: bytes
    marker: Path
    evidence: tuple[str, ...]
    live_under_plain_pickle: bool

    def assert_nothing_ran(self) -> None:
        assert not self.marker.exists(), f"the payload ran: {self.marker} was created"


@pytest.fixture(params=TRAP_PARAMS)
def trap(request, tmp_path, monkeypatch) -> Armed:
    trap, storage = request.param
    ctx = TrapContext(tmp_path / "pwned", tmp_path / "modules", monkeypatch, request)
    data, evidence = trap.build(ctx)
    # Parsing the opcodes runs nothing; it proves the pickle is well formed,
    # so a refusal cannot be a mere parse error.
    pickletools.dis(data, out=io.StringIO())
    return Armed(store(data, storage), data, ctx.marker, evidence, trap.live_under_plain_pickle)


# --------------------------------------------------------------------------
# The traps are live
# --------------------------------------------------------------------------


def test_each_trap_really_runs_code_under_plain_pickle(trap, tmp_path):
    """Control: plain ``pickle.loads``, in a separate process, does run each payload.

    Without this a trap could be a dud, and the tests below would pass for
    the wrong reason. The child process has the same interpreter and the same
    ``sys.path`` (so the tripwire module is found), and its payload writes
    the same harmless marker under ``tmp_path``. A trap that plain pickle
    refuses is run by an unpickler whose ``find_class`` walks dotted names,
    the mistake it is there to catch.
    """
    script = textwrap.dedent(
        """
        import importlib, io, pickle, sys

        class WalkingUnpickler(pickle.Unpickler):
            def find_class(self, module, name):
                found = importlib.import_module(module)
                for part in name.split("."):
                    found = getattr(found, part)
                return found

        data = sys.stdin.buffer.read()
        try:
            if sys.argv[1] == "plain":
                pickle.loads(data)
            else:
                WalkingUnpickler(io.BytesIO(data)).load()
        except Exception as exc:
            # Running the payload is what counts, not what it returns.
            print(type(exc).__name__, exc, file=sys.stderr)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", script, "plain" if trap.live_under_plain_pickle else "walking"],
        input=trap.pickle,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert trap.marker.exists(), f"the payload did not run under plain pickle: {result.stderr.decode()}"


# --------------------------------------------------------------------------
# Refused, everywhere a row is read
# --------------------------------------------------------------------------


def test_db_to_email_refuses_the_trap(trap):
    """The codec's public decoder returns None and runs nothing, for str and for bytes."""
    assert db_to_email(trap.data) is None
    assert db_to_email(trap.data.encode("latin-1")) is None
    trap.assert_nothing_ran()


def test_model_properties_run_nothing(trap):
    """``Message.email`` and what is built on it (``__str__``, subject, recipients) stay inert."""
    message = Message.objects.create(message_data=trap.data)
    assert message.email is None
    assert message.subject == ""
    assert message.to_addresses == []
    assert str(message) == "<Message repr unavailable>"
    log = MessageLog.objects.create(
        message_data=trap.data,
        message_id="<forged@example.com>",
        when_added=timezone.now(),
        priority=PRIORITY_MEDIUM,
        result=RESULT_FAILURE,
    )
    assert log.email is None
    assert log.to_addresses is None
    assert str(log) == f'On {log.when_attempted}, "<forged@example.com>"'
    trap.assert_nothing_ran()


def test_sending_refuses_the_trap_and_keeps_the_row(trap, deliver_to_smtp):
    """The worker runs nothing, delivers nothing for the row, and keeps it, deferred, with a reason.

    The row goes first (high priority) and a genuine message after it, so
    this also shows that a refused row does not stop the pass. A second pass
    after ``retry_deferred`` refuses it again, just as safely.
    """
    forged = Message.objects.create(message_data=trap.data, priority=PRIORITY_HIGH)
    mailer.send_mail("Genuine", "Body", "from@example.com", ["genuine@example.com"])

    engine.send_all()

    trap.assert_nothing_ran()
    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Genuine"]
    assert all(r.rcpt_tos == ["genuine@example.com"] for r in deliver_to_smtp.received)
    forged.refresh_from_db()
    assert forged.priority == PRIORITY_DEFERRED
    assert forged.message_data == trap.data, "the row is kept as it was, for the operator to inspect"
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert any(word in failure.log_message for word in trap.evidence), (
        f"the failure log should say what was refused ({' or '.join(trap.evidence)}): {failure.log_message!r}"
    )
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 1

    assert Message.objects.retry_deferred() == 1
    engine.send_all()

    trap.assert_nothing_ran()
    assert len(deliver_to_smtp.received) == 1
    assert Message.objects.get().priority == PRIORITY_DEFERRED
    assert MessageLog.objects.filter(result=RESULT_FAILURE).count() == 2


# What the admin shows for a row it cannot read: the reason follows.
CANT_DECODE = ("Can't decode: legacy pickle refused: ", "Can't decode: message data is ")


def test_admin_pages_render_without_running_the_trap(trap, admin_client):
    """The operator looking at the queue and the log must not run the row either.

    The log keeps a copy of ``message_data``, so the log's pages read the
    forged data too. The row is listed, and its page says the data cannot be
    decoded, and why.
    """
    message = Message.objects.create(message_data=trap.data)
    log = MessageLog.objects.create(
        message_data=trap.data,
        when_added=timezone.now(),
        priority=PRIORITY_MEDIUM,
        result=RESULT_FAILURE,
        log_message="refused",
    )

    assert [row["id"] for row in changelist(admin_client, "message")] == [str(message.pk)]
    trap.assert_nothing_ran()
    assert change_page(admin_client, "message", message.pk)["plain_text_body"].startswith(CANT_DECODE)
    trap.assert_nothing_ran()
    assert [(row["id"], row["result"]) for row in changelist(admin_client, "messagelog")] == [(str(log.pk), "failure")]
    trap.assert_nothing_ran()
    assert change_page(admin_client, "messagelog", log.pk)["plain_text_body"].startswith(CANT_DECODE)
    trap.assert_nothing_ran()


# --------------------------------------------------------------------------
# Genuine legacy rows still send
# --------------------------------------------------------------------------


def received_attachments(message) -> list[tuple[str | None, str, bytes, str | None]]:
    """(filename, content type, decoded content, Content-ID) of each attachment, text as it was queued."""
    found = []
    for part in message.iter_attachments():
        content = part.get_payload(decode=True)
        if part.get_content_maintype() == "text":
            # SMTP's CRLF back to LF; MIME ends a text part with a line break.
            content = content.replace(b"\r\n", b"\n").removesuffix(b"\n")
        found.append((part.get_filename(), part.get_content_type(), content, part["Content-ID"]))
    return found


def text_of(part) -> str:
    """A received text part as queued: SMTP's CRLF back to LF, MIME's final line break dropped."""
    return part.get_content().replace("\r\n", "\n").removesuffix("\n")


@pytest.mark.parametrize("protocol", sorted({3, 4, pickle.HIGHEST_PROTOCOL}))
def test_base64_pickle_of_django_mailer_2_is_delivered_intact(protocol, deliver_to_smtp):
    """What django-mailer 2.x queued: base64 of ``pickle.dumps(email)`` (protocol 3 or 4 by Python version).

    The message uses what a restricted unpickler must still admit: Django's
    EmailMultiAlternatives and its named tuples, bytes, and a stdlib
    MIMEImage (with its ``email._policybase.Compat32`` policy) as an inline
    image, as sites did for logos.
    """
    email = EmailMultiAlternatives(
        subject="Quarterly report \u2014 \u00e9t\u00e9",
        body="Plain text\nover two lines",
        from_email="Reports <reports@example.com>",
        to=["ann@example.com"],
        cc=["bob@example.com"],
        bcc=["audit@example.com"],
        reply_to=["help@example.com"],
        headers={"X-Campaign": "q3"},
    )
    email.attach_alternative('<p>Report <img src="cid:logo@example.com"></p>', "text/html")
    email.attach("report.pdf", b"%PDF-1.4\x00\xff\xfe binary", "application/pdf")
    email.attach("notes.txt", "line one\nline two", "text/plain")
    from email.mime.image import MIMEImage

    logo = MIMEImage(GIF, "gif")
    logo.add_header("Content-ID", "<logo@example.com>")
    logo.add_header("Content-Disposition", "inline", filename="logo.gif")
    # Appended directly: Django 6 warns about attach() of a MIMEBase, but
    # rows queued under Django 4.2/5.x hold them.
    email.attachments.append(logo)
    data = base64.encodebytes(pickle.dumps(email, protocol=protocol)).decode("ascii")
    Message.objects.create(message_data=data)

    engine.send_all()

    assert Message.objects.count() == 0
    assert MessageLog.objects.get().result == RESULT_SUCCESS
    (received,) = deliver_to_smtp.received
    message = received.message
    assert message["Subject"] == "Quarterly report \u2014 \u00e9t\u00e9"
    assert str(message["From"]) == "Reports <reports@example.com>"
    assert [a.addr_spec for a in message["To"].addresses] == ["ann@example.com"]
    assert [a.addr_spec for a in message["Cc"].addresses] == ["bob@example.com"]
    assert [a.addr_spec for a in message["Reply-To"].addresses] == ["help@example.com"]
    assert message["Bcc"] is None
    assert message["X-Campaign"] == "q3"
    assert sorted(received.rcpt_tos) == ["ann@example.com", "audit@example.com", "bob@example.com"]
    assert text_of(message.get_body(preferencelist=("plain",))) == "Plain text\nover two lines"
    assert text_of(message.get_body(preferencelist=("html",))) == '<p>Report <img src="cid:logo@example.com"></p>'
    assert received_attachments(message) == [
        ("report.pdf", "application/pdf", b"%PDF-1.4\x00\xff\xfe binary", None),
        ("notes.txt", "text/plain", b"line one\nline two", None),
        ("logo.gif", "image/gif", GIF, "<logo@example.com>"),
    ]


def test_raw_protocol_0_pickle_from_before_django_mailer_2_is_delivered_intact(deliver_to_smtp):
    """What releases before 2.0 stored: the protocol-0 pickle text itself.

    Protocol 0 writes Python 2's module names (``copy_reg``,
    ``__builtin__``), which a restricted unpickler has to accept as well.
    Characters beyond Latin-1 are escaped, so such a row is plain ASCII.
    """
    email = EmailMessage(
        subject="Invoice 5 \u20ac",
        body="Old body\nsecond line",
        from_email="billing@example.com",
        to=["carol@example.com"],
        cc=["dave@example.com"],
        headers={"X-Legacy": "yes"},
        attachments=[("terms.txt", "Pay within 30 days", "text/plain")],
    )
    raw = pickle.dumps(email, protocol=0)
    assert b"copy_reg" in raw and raw.isascii()
    Message.objects.create(message_data=raw.decode("latin-1"))

    engine.send_all()

    assert Message.objects.count() == 0
    assert MessageLog.objects.get().result == RESULT_SUCCESS
    (received,) = deliver_to_smtp.received
    message = received.message
    assert message["Subject"] == "Invoice 5 \u20ac"
    assert str(message["From"]) == "billing@example.com"
    assert message["X-Legacy"] == "yes"
    assert sorted(received.rcpt_tos) == ["carol@example.com", "dave@example.com"]
    assert text_of(message.get_body(preferencelist=("plain",))) == "Old body\nsecond line"
    assert received_attachments(message) == [("terms.txt", "text/plain", b"Pay within 30 days", None)]


# --------------------------------------------------------------------------
# New rows are JSON
# --------------------------------------------------------------------------


def queued_rich_email() -> Message:
    """Queue an email with every kind of part and return its row."""
    email = EmailMultiAlternatives("Fresh", "Text", "from@example.com", ["to@example.com"], headers={"X-A": "1"})
    email.attach_alternative("<p>Html</p>", "text/html")
    email.attach("data.bin", b"\x00\x01\xff", "application/octet-stream")
    Message.for_email(email).save()
    return Message.objects.get()


def test_new_rows_are_json_and_never_pickles():
    """A row queued today parses as JSON, so reading it back needs no unpickler.

    (A base64 pickle or a protocol-0 pickle is not JSON, so this also says
    the row is not one.)
    """
    row = queued_rich_email()
    document = json.loads(row.message_data)
    assert isinstance(document, dict)
    decoded = row.email
    assert (decoded.subject, decoded.alternatives[0].content, decoded.attachments[0].content) == (
        "Fresh",
        "<p>Html</p>",
        b"\x00\x01\xff",
    )


def test_email_to_db_writes_json_for_every_message_class():
    """Whatever the class, the codec writes JSON: there is no pickle fallback for new rows."""
    for email in (
        EmailMessage("S", "B", "f@example.com", ["t@example.com"]),
        EmailMultiAlternatives("S", "B", "f@example.com", ["t@example.com"]),
    ):
        assert isinstance(json.loads(email_to_db(email)), dict)


class Tripwire:
    """A class that is not an email: creating or filling one in any way creates the marker.

    A JSON row names the class to rebuild; a forged row naming this class
    must be refused, before any of these run.
    """

    marker: Path | None = None

    @classmethod
    def _trip(cls) -> None:
        if cls.marker is not None:
            cls.marker.write_text("pwned")

    def __new__(cls, *args, **kwargs):
        cls._trip()
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self._trip()

    def __setstate__(self, state):
        self._trip()

    def __setattr__(self, name, value):
        self._trip()


def replace_class_reference(document, old_module: str, old_name: str, new_module: str, new_name: str):
    """Return ``document`` with every reference to ``old_module.old_name`` pointing at the new class, and a count.

    The format may write a class as one dotted string, or module and name
    apart, so each form is replaced. Django re-exports its classes from
    ``django.core.mail``, so that spelling counts too.
    """
    full_names = {f"{old_module}.{old_name}", f"django.core.mail.{old_name}"}
    modules = {old_module, "django.core.mail"}
    count = 0

    def walk(value):
        nonlocal count
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            if value in full_names:
                count += 1
                return f"{new_module}.{new_name}"
            if value == old_name:
                count += 1
                return new_name
            if value in modules:
                return new_module
        return value

    return walk(document), count


@pytest.mark.parametrize("target", ["tripwire-class", "os.system", "importable-module"])
def test_a_forged_json_row_naming_another_class_is_refused(target, tmp_path, monkeypatch, request):
    """A JSON row that names a class other than an email class rebuilds nothing and runs nothing.

    The format must name the class for subclasses (AnymailMessage) to come
    back as themselves; a forger can name anything. Three forgeries: a class
    whose construction is observable, a dangerous callable, and a module
    whose import is observable (an allow-list must be checked before
    importing).
    """
    marker = tmp_path / "pwned"
    monkeypatch.setattr(Tripwire, "marker", marker)
    row = queued_rich_email()
    document = json.loads(row.message_data)
    # The format names the class by its dotted path; if that ever changes,
    # this test must be rewritten for the new format, not pass without forging.
    assert document["email"]["class"] == "django.core.mail.message.EmailMultiAlternatives"
    if target == "tripwire-class":
        new_module, new_name = __name__, "Tripwire"
    elif target == "os.system":
        new_module, new_name = "os", "system"
    else:
        ctx = TrapContext(marker, tmp_path / "modules", monkeypatch, request)
        new_module, new_name = ctx.tripwire_module("email_tripwire"), "Thing"
    forged, count = replace_class_reference(
        document, "django.core.mail.message", "EmailMultiAlternatives", new_module, new_name
    )
    assert count == 1, f"expected the one class reference to be forged, replaced {count}"
    data = json.dumps(forged)

    assert db_to_email(data) is None
    assert not marker.exists()

    message = Message.objects.create(message_data=data)
    assert message.email is None
    assert not marker.exists()


def test_a_pickled_email_backend_is_never_constructed(tmp_path):
    """django-mailer pickled the DbBackend along with messages; a row must not be able to call a backend."""
    import base64
    import pickle

    from django.core.mail import EmailMessage
    from django.core.mail.backends import filebased

    from mailer.codec import db_to_email, decode
    from mailer.exceptions import RefusedPickle

    target = tmp_path / "made-by-a-row"

    class ForgedConnection:
        def __reduce__(self):
            return (filebased.EmailBackend, (str(target),))

    email = EmailMessage("Forged", "Body", "f@example.com", ["t@example.com"])
    connection_field = "_connection" if "_connection" in vars(email) else "connection"  # Django 6.1 / earlier
    vars(email)[connection_field] = ForgedConnection()
    as_connection = base64.encodebytes(pickle.dumps(email)).decode("ascii")
    vars(email)[connection_field] = None
    email.extra_headers["X-Forged"] = ForgedConnection()
    as_header = base64.encodebytes(pickle.dumps(email)).decode("ascii")

    # Where django-mailer kept it, the backend is dropped unread.
    assert db_to_email(as_connection).subject == "Forged"
    # Anywhere else it is not part of an email: the row is refused.
    with pytest.raises(RefusedPickle, match="django.core.mail.backends.filebased.EmailBackend"):
        decode(as_header)
    assert not target.exists()


# --------------------------------------------------------------------------
# Migration 0010 converts genuine rows and leaves forged ones alone
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("before_conversion")
def test_migration_0010_converts_genuine_rows_and_leaves_every_trap_as_it_was(tmp_path, monkeypatch, request):
    """``migrate`` after switching from django-mailer reads every pickled row once: it must run no trap.

    The queue holds genuine django-mailer rows and every trap of the
    catalogue, in both tables. Afterwards the genuine rows are JSON with their
    searchable columns filled (so the migration did run over the rows), and
    each trap is exactly as it was, its columns still empty and its marker
    never created: the engine defers it with the reason when its turn comes.
    """
    traps = []
    old = models_before_conversion()
    catalogue = [(trap, storage) for trap in TRAPS for storage in trap.storages]
    for index, (trap, storage) in enumerate(catalogue):
        ctx = TrapContext(tmp_path / f"pwned-{index}", tmp_path / "modules", monkeypatch, request)
        data, _evidence = trap.build(ctx)
        message = old.Message.objects.create(message_data=store(data, storage))
        log = old.MessageLog.objects.create(
            message_data=store(data, storage),
            when_added=timezone.now(),
            priority=PRIORITY_MEDIUM,
            result=RESULT_FAILURE,
            log_message="",
        )
        traps.append((f"{trap.id}-{storage}", ctx.marker, message, log))
    genuine = EmailMessage("Genuine ✓", "Body", "from@example.com", ["to@example.com"], cc=["cc@example.com"])
    genuine_message = old.Message.objects.create(message_data=base64.encodebytes(pickle.dumps(genuine)).decode("ascii"))
    genuine_log = old.MessageLog.objects.create(
        message_data=pickle.dumps(genuine, protocol=0).decode("ascii"),
        when_added=timezone.now(),
        priority=PRIORITY_MEDIUM,
        result=RESULT_SUCCESS,
        log_message="",
    )

    migrate_mailer("0010_convert_pickled_message_data")

    for row in (genuine_message, genuine_log):
        row.refresh_from_db()
        assert json.loads(row.message_data)["mailer"] == 1
        assert (row.subject, row.from_email, row.recipients) == (
            "Genuine ✓",
            "from@example.com",
            "to@example.com, cc@example.com",
        )
    for trap_id, marker, message, log in traps:
        assert not marker.exists(), f"{trap_id}: the payload ran during migrate"
        for row, before in ((message, message.message_data), (log, log.message_data)):
            row.refresh_from_db()
            assert row.message_data == before, f"{trap_id}: the forged row was changed"
        assert (message.subject, message.recipients) == ("", ""), trap_id
        assert (log.subject, log.recipients) == (None, None), trap_id
