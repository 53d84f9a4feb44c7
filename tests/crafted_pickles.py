"""Pickles written opcode by opcode, to attack mailer's legacy reader (``mailer.legacy``).

``pickle.dumps`` can only write what an object's ``__reduce__`` says; an
attacker writing a queue row is not bound by that. So the traps here are
assembled from a small expression tree (``Call``, ``New``, ``Build``,
``SetItems``...) into the opcodes of a chosen protocol, in the style that
protocol uses (text opcodes for 0, binary ones for 2, framed streams with
``STACK_GLOBAL`` and ``MEMOIZE`` for 4 and 5), and stored the way
django-mailer stored rows: base64 (2.x) or the pickle itself (before 2.0).

Every call a trap would make under a real unpickler lands in ``sentinel`` or
``Sentinel``: they record the call in ``CALLS`` and create the marker file
named by their argument. Every mutation a trap would make is visible in
``fingerprint()``. The tests check both after mailer has read each trap (the
list stays empty, no marker, same fingerprint), and run each trap under a
real unpickler in a child process (``run_under_plain_pickle``) to prove it
is live.

This module imports nothing of mailer and nothing that needs Django's
settings, so that the child process can import it as it is.
"""

import base64
import copyreg
import dataclasses
import datetime
import email.charset
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict
from dataclasses import dataclass, field
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import django.core.mail
import django.core.mail.message
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.safestring import SafeString

MailersHandler = getattr(django.core.mail, "MailersHandler", None)  # Django 6.1 and later

# --------------------------------------------------------------------------
# What a trap would call: record the call, leave a mark
# --------------------------------------------------------------------------

#: Every call of ``sentinel`` or ``Sentinel`` in this process, in order.
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

#: Only paths ending so are created, so that a stray argument never writes a file.
MARKER_SUFFIX = ".pwned"


def _leave_marks(args: tuple[Any, ...]) -> None:
    for arg in args:
        if isinstance(arg, str) and arg.endswith(MARKER_SUFFIX):
            Path(arg).write_text("a trap ran")


def sentinel(*args: Any, **kwargs: Any) -> str:
    """The function the traps call (REDUCE, INST, OBJ, EXT1, persistent ids)."""
    CALLS.append(("sentinel", args, kwargs))
    _leave_marks(args)
    return "sentinel was called"


class Sentinel:
    """The class the traps create (NEWOBJ, NEWOBJ_EX, INST, OBJ, EXT2)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Sentinel":
        CALLS.append(("Sentinel.__new__", args, kwargs))
        _leave_marks(args)
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CALLS.append(("Sentinel.__init__", args, kwargs))
        _leave_marks(args)


# The copyreg extension registry entries the EXT traps use. A site that
# registers extensions (for its own pickles) has such entries; mailer must
# refuse EXT opcodes whatever the registry holds.
EXTENSIONS = {
    0xF1: (__name__, "sentinel"),  # EXT1
    0xF1F1: (__name__, "Sentinel"),  # EXT2
    0x7F1F1F1: ("django.core.mail.message", "EmailMessage"),  # EXT4
}


def register_extensions() -> None:
    for code, (module, name) in EXTENSIONS.items():
        copyreg.add_extension(module, name, code)


def unregister_extensions() -> None:
    for code, (module, name) in EXTENSIONS.items():
        if copyreg._extension_registry.get((module, name)) == code:  # type: ignore[attr-defined]
            copyreg.remove_extension(module, name, code)


# --------------------------------------------------------------------------
# What a trap would change
# --------------------------------------------------------------------------


def watched_classes() -> dict[str, type]:
    """The classes a trap may aim at: Django's email classes, SafeString, MIME classes, our own Sentinel."""
    classes = {
        "EmailMessage": EmailMessage,
        "EmailMultiAlternatives": EmailMultiAlternatives,
        "SafeString": SafeString,
        "MIMEBase": MIMEBase,
        "MIMEText": MIMEText,
        "MIMEMultipart": MIMEMultipart,
        "Sentinel": Sentinel,
        "datetime.datetime": datetime.datetime,
        "OrderedDict": OrderedDict,
    }
    if MailersHandler is not None:
        classes["MailersHandler"] = MailersHandler
    return classes


def fingerprint() -> dict[str, Any]:
    """Everything the traps try to change, copied so that a later change shows as a difference."""
    init = EmailMessage.__init__
    snapshot: dict[str, Any] = {f"vars({name})": dict(vars(cls)) for name, cls in watched_classes().items()}
    snapshot["EmailMessage.__init__"] = (dict(vars(init)), init.__defaults__, init.__kwdefaults__, init.__code__)
    snapshot["django.core.mail"] = {
        name: getattr(django.core.mail, name, None)
        for name in ("EmailMessage", "EmailMultiAlternatives", "send_mail", "get_connection")
    }
    snapshot["os.environ"] = dict(os.environ)
    snapshot["sys.modules"] = sorted(name for name in sys.modules if name.startswith("pwned"))
    snapshot["sys.path"] = list(sys.path)
    snapshot["email.charset.CHARSETS"] = dict(email.charset.CHARSETS)
    snapshot["ADDRESS_HEADERS"] = set(django.core.mail.message.ADDRESS_HEADERS)
    snapshot["copyreg"] = (
        dict(copyreg._extension_registry),  # type: ignore[attr-defined]
        dict(copyreg._inverted_registry),  # type: ignore[attr-defined]
    )
    return snapshot


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Name what differs between two fingerprints."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


# --------------------------------------------------------------------------
# An expression tree, and its assembly into opcodes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Global:
    """A name: GLOBAL (protocols below 4) or STACK_GLOBAL (4 and 5)."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``target(*args)``: REDUCE."""

    target: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class New:
    """``cls.__new__(cls, *args, **kwargs)``: NEWOBJ, or NEWOBJ_EX when there are keyword arguments."""

    cls: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Inst:
    """INST: ``module.name(*args)``, the name written in the opcode itself (protocol 0)."""

    module: str
    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Obj:
    """OBJ: ``cls(*args)``, the class taken from the stack after the MARK (protocol 1)."""

    cls: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Build:
    """BUILD: give ``target`` the state ``state`` (``setattr`` for the second half of a pair)."""

    target: Any
    state: Any


@dataclass(frozen=True)
class SetItems:
    """SETITEM (one pair) or SETITEMS onto ``target``."""

    target: Any
    pairs: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class Appends:
    """APPEND (one item) or APPENDS onto ``target``."""

    target: Any
    items: tuple[Any, ...]


@dataclass(frozen=True)
class AddItems:
    """ADDITEMS onto ``target``."""

    target: Any
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Ext:
    """EXT1, EXT2 or EXT4 (by the size of ``code``): the object the extension registry names."""

    code: int


@dataclass(frozen=True)
class PersistentId:
    """PERSID (text id) or BINPERSID (id from the stack): whatever ``persistent_load`` returns."""

    pid: str
    binary: bool = False


@dataclass(frozen=True)
class Memo:
    """Push ``value`` and remember it under ``name`` (PUT, BINPUT or MEMOIZE)."""

    name: str
    value: Any


@dataclass(frozen=True)
class Ref:
    """Push what ``Memo(name)`` remembered (GET or BINGET)."""

    name: str


@dataclass(frozen=True)
class Then:
    """Evaluate each of ``steps`` in turn and keep only the last one's value (POP the others)."""

    steps: tuple[Any, ...]


@dataclass
class _Assembler:
    protocol: int
    out: bytearray = field(default_factory=bytearray)
    memo: dict[str, int] = field(default_factory=dict)

    def emit(self, node: Any) -> None:  # noqa: C901 -- one case per node type
        if node is None:
            self.out += pickle.NONE
        elif isinstance(node, bool):
            self.out += (pickle.NEWTRUE if node else pickle.NEWFALSE) if self.protocol >= 2 else b"I0%d\n" % node
        elif isinstance(node, int):
            self.integer(node)
        elif isinstance(node, str):
            self.text(node)
        elif isinstance(node, bytes):
            self.out += pickle.SHORT_BINBYTES + bytes([len(node)]) + node
        elif isinstance(node, tuple):
            self.tuple(node)
        elif isinstance(node, list):
            self.items_of(pickle.EMPTY_LIST if self.protocol >= 2 else None, node, pickle.LIST, pickle.APPENDS)
        elif isinstance(node, dict):
            flat = [part for pair in node.items() for part in pair]
            self.items_of(pickle.EMPTY_DICT if self.protocol >= 2 else None, flat, pickle.DICT, pickle.SETITEMS)
        elif isinstance(node, Global):
            self.global_(node.module, node.name)
        elif isinstance(node, Call):
            self.emit(node.target)
            self.tuple(node.args)
            self.out += pickle.REDUCE
        elif isinstance(node, New):
            self.emit(node.cls)
            self.tuple(node.args)
            if node.kwargs is None:
                self.out += pickle.NEWOBJ
            else:
                self.emit(node.kwargs)
                self.out += pickle.NEWOBJ_EX
        elif isinstance(node, Inst):
            self.out += pickle.MARK
            for arg in node.args:
                self.emit(arg)
            self.out += pickle.INST + f"{node.module}\n{node.name}\n".encode("ascii")
        elif isinstance(node, Obj):
            self.out += pickle.MARK
            self.emit(node.cls)
            for arg in node.args:
                self.emit(arg)
            self.out += pickle.OBJ
        elif isinstance(node, Build):
            self.emit(node.target)
            self.emit(node.state)
            self.out += pickle.BUILD
        elif isinstance(node, SetItems):
            self.emit(node.target)
            if len(node.pairs) == 1:
                self.emit(node.pairs[0][0])
                self.emit(node.pairs[0][1])
                self.out += pickle.SETITEM
            else:
                self.marked([part for pair in node.pairs for part in pair], pickle.SETITEMS)
        elif isinstance(node, Appends):
            self.emit(node.target)
            if len(node.items) == 1:
                self.emit(node.items[0])
                self.out += pickle.APPEND
            else:
                self.marked(list(node.items), pickle.APPENDS)
        elif isinstance(node, AddItems):
            self.emit(node.target)
            self.marked(list(node.items), pickle.ADDITEMS)
        elif isinstance(node, Ext):
            self.ext(node.code)
        elif isinstance(node, PersistentId):
            if node.binary:
                self.text(node.pid)
                self.out += pickle.BINPERSID
            else:
                self.out += pickle.PERSID + node.pid.encode("ascii") + b"\n"
        elif isinstance(node, Memo):
            self.emit(node.value)
            self.put(node.name)
        elif isinstance(node, Ref):
            self.get(node.name)
        elif isinstance(node, Then):
            for step in node.steps[:-1]:
                self.emit(step)
                self.out += pickle.POP
            self.emit(node.steps[-1])
        else:
            raise TypeError(f"cannot assemble {node!r}")

    def integer(self, value: int) -> None:
        if self.protocol == 0:
            self.out += b"I%d\n" % value if abs(value) < 2**31 else b"L%dL\n" % value
        elif 0 <= value < 256:
            self.out += pickle.BININT1 + bytes([value])
        elif 0 <= value < 65536:
            self.out += pickle.BININT2 + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += pickle.BININT + struct.pack("<i", value)
        else:
            self.out += long_opcode(value)

    def text(self, value: str) -> None:
        if self.protocol == 0:
            # As pickle writes protocol 0: raw-unicode-escape, with what would end the line escaped.
            for char in "\\\0\n\r\x1a":
                value = value.replace(char, f"\\u{ord(char):04x}")
            self.out += pickle.UNICODE + value.encode("raw-unicode-escape") + b"\n"
            return
        raw = value.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(raw) < 256:
            self.out += pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
        else:
            self.out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw

    def tuple(self, items: tuple[Any, ...]) -> None:
        if self.protocol >= 2 and len(items) <= 3:
            for item in items:
                self.emit(item)
            self.out += (pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(items)]
        else:
            self.marked(list(items), pickle.TUPLE)

    def items_of(self, empty: bytes | None, items: list[Any], whole: bytes, more: bytes) -> None:
        if empty is None:  # protocol 0: MARK, the items, LIST or DICT
            self.marked(items, whole)
            return
        self.out += empty
        if items:
            self.marked(items, more)

    def marked(self, items: list[Any], closing: bytes) -> None:
        self.out += pickle.MARK
        for item in items:
            self.emit(item)
        self.out += closing

    def global_(self, module: str, name: str) -> None:
        if self.protocol >= 4:
            self.text(module)
            self.text(name)
            self.out += pickle.STACK_GLOBAL
        else:
            self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")

    def ext(self, code: int) -> None:
        if code < 256:
            self.out += pickle.EXT1 + bytes([code])
        elif code < 65536:
            self.out += pickle.EXT2 + struct.pack("<H", code)
        else:
            self.out += pickle.EXT4 + struct.pack("<i", code)

    def put(self, name: str) -> None:
        index = self.memo[name] = len(self.memo)
        if self.protocol == 0:
            self.out += pickle.PUT + b"%d\n" % index
        elif self.protocol >= 4:
            self.out += pickle.MEMOIZE
        elif index < 256:
            self.out += pickle.BINPUT + bytes([index])
        else:
            self.out += pickle.LONG_BINPUT + struct.pack("<I", index)

    def get(self, name: str) -> None:
        index = self.memo[name]
        if self.protocol == 0:
            self.out += pickle.GET + b"%d\n" % index
        elif index < 256:
            self.out += pickle.BINGET + bytes([index])
        else:
            self.out += pickle.LONG_BINGET + struct.pack("<I", index)


def long_opcode(value: int) -> bytes:
    """LONG1 or LONG4 of ``value``: two's complement, little-endian, as pickle writes it."""
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    if len(raw) < 256:
        return pickle.LONG1 + bytes([len(raw)]) + raw
    return pickle.LONG4 + struct.pack("<i", len(raw)) + raw


def assemble(node: Any, protocol: int) -> bytes:
    """Return the pickle (PROTO, a FRAME from 4 on, the opcodes of ``node``, STOP) in ``protocol``'s style."""
    assembler = _Assembler(protocol)
    assembler.emit(node)
    body = bytes(assembler.out) + pickle.STOP
    if protocol < 2:
        return body
    header = pickle.PROTO + bytes([protocol])
    if protocol >= 4:
        header += pickle.FRAME + struct.pack("<Q", len(body))
    return header + body


BASE64 = "base64"  # django-mailer 2.x
RAW = "raw"  # django-mailer before 2.0 (its protocol-0 text; here any pickle, as Latin-1 text)
STORAGES = (BASE64, RAW)


def as_row(raw: bytes, storage: str) -> str:
    """``raw`` as it would sit in ``message_data``."""
    if storage == BASE64:
        return base64.encodebytes(raw).decode("ascii")
    return raw.decode("latin-1")


# --------------------------------------------------------------------------
# Pieces of traps
# --------------------------------------------------------------------------

SENTINEL = Global(__name__, "sentinel")
SENTINEL_CLASS = Global(__name__, "Sentinel")
EMAIL_MESSAGE = Global("django.core.mail.message", "EmailMessage")
EMAIL_MULTI = Global("django.core.mail.message", "EmailMultiAlternatives")


def python2(module: str, protocol: int) -> str:
    """Protocol 0 and 2 pickles of Python 2 named these modules so; mailer maps the names back."""
    if protocol > 2:
        return module
    return {"copyreg": "copy_reg", "builtins": "__builtin__"}.get(module, module)


def instance_of(cls: Global, state: dict[str, Any], protocol: int) -> Any:
    """An object of ``cls`` with ``state``, the way pickle writes it: copyreg in protocol 0, NEWOBJ after."""
    made: Call | New
    if protocol == 0:
        made = Call(
            Global(python2("copyreg", 0), "_reconstructor"), (cls, Global(python2("builtins", 0), "object"), None)
        )
    else:
        made = New(cls)
    return Build(made, state)


def email_with(protocol: int, cls: Global = EMAIL_MESSAGE, **fields: Any) -> Any:
    """A Django email as pickle writes one, with ``fields`` replacing the plain defaults."""
    state: dict[str, Any] = {
        "subject": "Hello",
        "body": "Body",
        "from_email": "from@example.com",
        "to": ["to@example.com"],
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "extra_headers": {},
        "attachments": [],
    }
    if cls == EMAIL_MULTI:
        state["alternatives"] = []
    state.update(fields)
    return instance_of(cls, state, protocol)


def on_class(target: Any, attributes: dict[str, Any]) -> Build:
    """BUILD with ``(None, attributes)``: pickle then ``setattr``s each on the target, a class included."""
    return Build(target, (None, attributes))


def dotted(module: str, path: str, protocol: int) -> Any:
    """Reach ``module.path`` (a dotted attribute path).

    Protocols 4 and 5 name it directly (STACK_GLOBAL walks dotted names);
    below 4 the name cannot hold a dot, so it is fetched with
    ``builtins.getattr``, one REDUCE per step.
    """
    if protocol >= 4:
        return Global(module, path)
    first, *rest = path.split(".")
    node: Any = Global(module, first)
    for name in rest:
        node = Call(Global(python2("builtins", protocol), "getattr"), (node, name))
    return node


# --------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------

PROTOCOLS = (0, 2, 4, 5)

FILE = "file"  # under a real unpickler, the marker file is created
PERSISTENT = "persistent"  # live under an unpickler with persistent_load (plain pickle has none)


@dataclass(frozen=True)
class Trap:
    """One crafted pickle: what it aims at, what mailer must say when refusing it, what it does when live.

    ``effect`` is ``FILE`` (a call that creates the marker) or the name of a
    ``fingerprint()`` entry that a real unpickler changes.
    """

    id: str
    family: str
    protocol: int
    node: Any
    refusal: str
    effect: str = FILE
    unpickler: str = "plain"

    def pickle(self) -> bytes:
        return assemble(self.node, self.protocol)


CALLED = r"it asks for tests\.crafted_pickles\.(sentinel|Sentinel)"
SETS_STATE = r"it sets the state of"
SETS_ITEMS = r"it sets items on a"
APPENDS = r"it appends to a"


def _traps_for(protocol: int, marker_dir: Path) -> list[Trap]:
    p = protocol
    marker = MARKER
    traps: list[Trap] = []

    def add(family: str, name: str, node: Any, refusal: str, effect: str = FILE, unpickler: str = "plain") -> None:
        trap_id = f"{family}-{name}-protocol{p}"
        node = _substitute(node, MARKER, marker_path(trap_id, marker_dir))
        traps.append(Trap(trap_id, family, p, node, refusal, effect, unpickler))

    # REDUCE: the call itself, and calls hidden inside the shapes mailer admits.
    add("REDUCE", "sentinel", Call(SENTINEL, (marker,)), CALLED)
    add("REDUCE", "in-EmailMessage-subject", email_with(p, subject=Call(SENTINEL, (marker,))), CALLED)
    add(
        "REDUCE",
        "in-EmailMultiAlternatives-alternative",
        email_with(p, EMAIL_MULTI, alternatives=[(Call(SENTINEL, (marker,)), "text/html")]),
        CALLED,
    )
    add(
        "REDUCE",
        "in-SafeString",
        email_with(p, body=Call(Global("django.utils.safestring", "SafeString"), (Call(SENTINEL, (marker,)),))),
        CALLED,
    )
    add(
        "REDUCE",
        "in-MIMEText-payload",
        email_with(
            p,
            attachments=[
                instance_of(
                    Global("email.mime.text", "MIMEText"),
                    {"_headers": [], "_payload": Call(SENTINEL, (marker,)), "_charset": None},
                    p,
                )
            ],
        ),
        CALLED,
    )
    add(
        "REDUCE",
        "in-MIMEBase-header",
        email_with(
            p,
            attachments=[
                instance_of(
                    Global("email.mime.base", "MIMEBase"),
                    {"_headers": [("X-Trap", Call(SENTINEL, (marker,)))], "_payload": "x"},
                    p,
                )
            ],
        ),
        CALLED,
    )
    add(
        "REDUCE",
        "in-datetime-tzinfo",
        Call(Global("datetime", "datetime"), (2026, 1, 2, 3, 4, 5, 0, New(SENTINEL_CLASS, (marker,)))),
        CALLED,
    )
    add(
        "REDUCE",
        "in-OrderedDict",
        SetItems(Call(Global("collections", "OrderedDict")), (("key", Call(SENTINEL, (marker,))),)),
        CALLED,
    )
    add(
        "REDUCE",
        "in-header-of-email",
        email_with(p, extra_headers={"X-Trap": Call(SENTINEL, (marker,))}),
        CALLED,
    )
    # NEWOBJ and NEWOBJ_EX: a class's __new__.
    add("NEWOBJ", "Sentinel", New(SENTINEL_CLASS, (marker,)), CALLED)
    add("NEWOBJ", "Sentinel-as-attachment", email_with(p, attachments=[New(SENTINEL_CLASS, (marker,))]), CALLED)
    add("NEWOBJ_EX", "Sentinel", New(SENTINEL_CLASS, (marker,), {"how": "NEWOBJ_EX"}), CALLED)
    add("NEWOBJ_EX", "Sentinel-as-to", email_with(p, to=[New(SENTINEL_CLASS, (marker,), {"how": "ex"})]), CALLED)
    # INST and OBJ: the older ways to call.
    add("INST", "sentinel", Inst(__name__, "sentinel", (marker,)), CALLED)
    add("INST", "Sentinel", Inst(__name__, "Sentinel", (marker,)), CALLED)
    add("OBJ", "sentinel", Obj(SENTINEL, (marker,)), CALLED)
    add("OBJ", "Sentinel", Obj(SENTINEL_CLASS, (marker,)), CALLED)
    # BUILD with (None, {...}): setattr on classes, a function and a module.
    add(
        "BUILD",
        "EmailMessage.recipients",
        on_class(EMAIL_MESSAGE, {"recipients": SENTINEL}),
        SETS_STATE,
        "vars(EmailMessage)",
    )
    add(
        "BUILD",
        "EmailMultiAlternatives.attach_alternative",
        on_class(EMAIL_MULTI, {"attach_alternative": SENTINEL}),
        SETS_STATE,
        "vars(EmailMultiAlternatives)",
    )
    add(
        "BUILD",
        "SafeString.__html__",
        on_class(Global("django.utils.safestring", "SafeString"), {"__html__": SENTINEL}),
        SETS_STATE,
        "vars(SafeString)",
    )
    add(
        "BUILD",
        "MIMEBase.as_bytes",
        on_class(Global("email.mime.base", "MIMEBase"), {"as_bytes": SENTINEL}),
        SETS_STATE,
        "vars(MIMEBase)",
    )
    add("BUILD", "Sentinel.pwned", on_class(SENTINEL_CLASS, {"pwned": True}), SETS_STATE, "vars(Sentinel)")
    if MailersHandler is not None:
        add(
            "BUILD",
            "MailersHandler.settings",
            on_class(
                Global("django.core.mail.handler", "MailersHandler"),
                {"settings": {"default": {"BACKEND": f"{__name__}.Sentinel"}}},
            ),
            SETS_STATE,
            "vars(MailersHandler)",
        )
    add(
        "BUILD",
        "django.core.mail-module",
        on_class(Global("django.core", "mail"), {"EmailMessage": SENTINEL_CLASS}),
        SETS_STATE,
        "django.core.mail",
    )
    add(
        "BUILD",
        "EmailMessage.__init__",
        Build(dotted("django.core.mail", "EmailMessage.__init__", p), ({"pwned": True}, {"__kwdefaults__": {}})),
        r"it sets the state of|it asks for builtins\.getattr",
        "EmailMessage.__init__",
    )
    # SETITEM, SETITEMS, APPEND, APPENDS, ADDITEMS onto objects that are not the pickle's own.
    add(
        "SETITEM",
        "os.environ",
        SetItems(Global("os", "environ"), (("MAILER_PWNED", "1"),)),
        SETS_ITEMS,
        "os.environ",
    )
    add(
        "SETITEMS",
        "sys.modules",
        SetItems(Global("sys", "modules"), (("pwned_module", SENTINEL), ("pwned_other", SENTINEL_CLASS))),
        SETS_ITEMS,
        "sys.modules",
    )
    add(
        "SETITEM",
        "email.charset.CHARSETS",
        SetItems(Global("email.charset", "CHARSETS"), (("pwned-charset", (None, None, None)),)),
        SETS_ITEMS,
        "email.charset.CHARSETS",
    )
    add(
        "SETITEM",
        "sys.modules-through-collections",
        SetItems(dotted("collections", "_sys.modules", p), (("pwned_module", SENTINEL),)),
        r"it sets items on a|it asks for builtins\.getattr",
        "sys.modules",
    )
    add("APPEND", "sys.path", Appends(Global("sys", "path"), ("/pwned/path",)), APPENDS, "sys.path")
    add("APPENDS", "sys.path", Appends(Global("sys", "path"), ("/pwned/one", "/pwned/two")), APPENDS, "sys.path")
    add(
        "ADDITEMS",
        "ADDRESS_HEADERS",
        AddItems(Global("django.core.mail.message", "ADDRESS_HEADERS"), ("x-pwned", "x-pwned-too")),
        r"it adds set items to something not a set",
        "ADDRESS_HEADERS",
    )
    # The extension registry: EXT1 a function, EXT2 a class, EXT4 Django's EmailMessage (then BUILD).
    add("EXT1", "sentinel", Call(Ext(0xF1), (marker,)), r"it uses EXT1")
    add("EXT2", "Sentinel", New(Ext(0xF1F1), (marker,)), r"it uses EXT2")
    add(
        "EXT4",
        "EmailMessage.recipients",
        on_class(Ext(0x7F1F1F1), {"recipients": SENTINEL}),
        r"it uses EXT4",
        "vars(EmailMessage)",
    )
    add("EXT1", "in-email-body", email_with(p, body=Call(Ext(0xF1), (marker,))), r"it uses EXT1")
    # Persistent ids: whatever the unpickler's persistent_load makes of them.
    add(
        "PERSID",
        "sentinel",
        Call(PersistentId(f"{__name__} sentinel"), (marker,)),
        r"it uses PERSID",
        unpickler=PERSISTENT,
    )
    add(
        "BINPERSID",
        "Sentinel",
        New(PersistentId(f"{__name__} Sentinel", binary=True), (marker,)),
        r"it uses BINPERSID",
        unpickler=PERSISTENT,
    )
    return traps


def catalogue(marker_dir: Path) -> list[Trap]:
    """Every trap in every protocol; each trap's marker is its own file in ``marker_dir``."""
    return [trap for protocol in PROTOCOLS for trap in _traps_for(protocol, marker_dir)]


def marker_path(trap_id: str, marker_dir: Path) -> str:
    """The file a trap's call would create: the argument it passes to the sentinel."""
    return str(marker_dir / f"{trap_id}{MARKER_SUFFIX}")


# Stands for the marker path while a trap is written down.
MARKER = "<marker>"


def _substitute(node: Any, old: Any, new: Any) -> Any:
    """Return ``node`` with every ``old`` replaced by ``new``, inside containers and tree nodes."""
    if isinstance(node, str):
        return new if node == old else node
    if isinstance(node, tuple):
        return tuple(_substitute(item, old, new) for item in node)
    if isinstance(node, list):
        return [_substitute(item, old, new) for item in node]
    if isinstance(node, dict):
        return {_substitute(key, old, new): _substitute(value, old, new) for key, value in node.items()}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changed = {item.name: _substitute(getattr(node, item.name), old, new) for item in dataclasses.fields(node)}
        return dataclasses.replace(node, **changed)
    return node


# --------------------------------------------------------------------------
# The control: each trap under a real unpickler, in a child process
# --------------------------------------------------------------------------

_CONTROL_SCRIPT = textwrap.dedent(
    """
    import importlib, io, json, os, pickle, sys

    import django
    django.setup()
    from tests import crafted_pickles as crafted

    class ResolvingUnpickler(pickle.Unpickler):
        # A naive persistent_load: the id names a module and an attribute.
        def persistent_load(self, pid):
            module, name = pid.split(" ")
            return getattr(importlib.import_module(module), name)

    crafted.register_extensions()
    jobs = json.load(sys.stdin)
    results = {}
    for job in jobs:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # one trap per forked child, so that no trap sees another's changes
            os.close(read)
            before = crafted.fingerprint()
            data = bytes.fromhex(job["pickle"])
            try:
                if job["unpickler"] == "persistent":
                    ResolvingUnpickler(io.BytesIO(data)).load()
                else:
                    pickle.loads(data)
                error = None
            except Exception as exc:  # what it did before failing is what counts
                error = f"{type(exc).__name__}: {exc}"
            report = {"changed": crafted.changes(before, crafted.fingerprint()), "calls": len(crafted.CALLS),
                      "error": error}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            output = pipe.read()
        os.waitpid(pid, 0)
        results[job["id"]] = json.loads(output)
    json.dump(results, sys.stdout)
    """
)


def run_under_plain_pickle(traps: list[Trap]) -> dict[str, dict[str, Any]]:
    """Unpickle each trap for real, each in a fresh fork of one child process; report what each did.

    For each trap id: ``changed`` (the fingerprint entries it changed),
    ``calls`` (how many calls reached the sentinel) and ``error`` (what the
    unpickler raised afterwards, if anything).
    """
    jobs = [{"id": trap.id, "pickle": trap.pickle().hex(), "unpickler": trap.unpickler} for trap in traps]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "tests.settings"),
    }
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _CONTROL_SCRIPT],
        input=json.dumps(jobs).encode(),
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"the control process failed:\n{result.stderr.decode()}")
    reports: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return reports


# --------------------------------------------------------------------------
# Bombs: rows that cost the reader time or memory
# --------------------------------------------------------------------------


def list_of_bytes_bomb(size: int = 64 * 1024 * 1024) -> bytes:
    """``list(bytes(size))``, protocol 0: a 64 MB list of ints (half a gigabyte) from a row of about 60 bytes."""
    return assemble(Call(Global("__builtin__", "list"), (Call(Global("__builtin__", "bytes"), (size,)),)), 0)


def hex_chain_bomb(levels: int = 24) -> bytes:
    """``codecs.encode`` to hex, ``levels`` times over: the text doubles at each level (16 GB from 24)."""
    node: Any = Call(Global("_codecs", "encode"), ("x" * 64, "latin1"))
    for _ in range(levels):
        node = Call(Global("_codecs", "encode"), (node, "hex"))
    return assemble(node, 2)


def billion_laughs(levels: int, protocol: int = 0, container: str = "list") -> bytes:
    """A list (or tuple) holding the one below it twice, ``levels`` deep: 2**levels leaves from a few hundred bytes."""
    steps: list[Any] = [Memo("level0", [] if container == "list" else ())]
    for level in range(1, levels + 1):
        previous = Ref(f"level{level - 1}")
        pair = [previous, previous] if container == "list" else (previous, previous)
        steps.append(Memo(f"level{level}", pair))
    return assemble(Then(tuple(steps)), protocol)


def mime_laughs(levels: int, protocol: int = 2, headers: bool = True) -> bytes:
    """An email whose attachment is a MIME part holding the part below it twice, ``levels`` deep.

    With ``headers``, each part says it is multipart/mixed, as a real one would.
    """
    mime = Global("email.mime.base", "MIMEBase")
    steps: list[Any] = [Memo("part0", instance_of(mime, {"_headers": [], "_payload": "x"}, protocol))]
    for level in range(1, levels + 1):
        previous = Ref(f"part{level - 1}")
        content_type = [("Content-Type", "multipart/mixed")] if headers else []
        steps.append(
            Memo(
                f"part{level}",
                instance_of(mime, {"_headers": content_type, "_payload": [previous, previous]}, protocol),
            )
        )
    return assemble(email_with(protocol, attachments=[Then(tuple(steps))]), protocol)


def nested_opcodes(depth: int, opening: bytes, closing: bytes) -> bytes:
    """``depth`` nested containers written as ``opening * depth + closing * depth`` (protocol 0 MARKs, say)."""
    return opening * depth + closing * depth + pickle.STOP


def nested_tuples(depth: int) -> bytes:
    """``((((),),),)``... ``depth`` deep with TUPLE1: one opcode per level."""
    return pickle.PROTO + b"\x02" + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.STOP


def nested_dicts(depth: int) -> bytes:
    """``{"k": {"k": ...}}`` ``depth`` deep: each dict set into the one below it with SETITEM."""
    key = pickle.BINUNICODE + struct.pack("<I", 1) + b"k"
    return (
        pickle.PROTO
        + b"\x02"
        + pickle.EMPTY_DICT
        + (key + pickle.EMPTY_DICT) * depth
        + pickle.SETITEM * depth
        + pickle.STOP
    )


def many_opcodes(count: int) -> bytes:
    """A valid pickle of ``count`` opcodes or so that builds nothing (None, pushed and popped)."""
    return pickle.PROTO + b"\x02" + pickle.NONE + (pickle.NONE + pickle.POP) * (count // 2) + pickle.STOP


def many_memo_entries(count: int) -> bytes:
    """One value, memoized ``count`` times (protocol 4's MEMOIZE)."""
    return pickle.PROTO + b"\x04" + pickle.NONE + pickle.MEMOIZE * count + pickle.STOP


def cyclic_list() -> bytes:
    """A list that holds itself (``l = []; l.append(l)``)."""
    return (
        pickle.PROTO
        + b"\x02"
        + pickle.EMPTY_LIST
        + pickle.BINPUT
        + b"\x00"
        + pickle.BINGET
        + b"\x00"
        + pickle.APPEND
        + pickle.STOP
    )


def colliding_int_keys(count: int) -> bytes:
    """A dict of ``count`` int keys that hash alike (multiples of 2**61 - 1): each insertion walks all the others."""
    modulus = 2**61 - 1
    pairs = b"".join(long_opcode(index * modulus) + pickle.NONE for index in range(1, count + 1))
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + pairs + pickle.SETITEMS + pickle.STOP


def repeated_tuple_key(width: int, uses: int) -> bytes:
    """A tuple of ``width`` items, memoized, then used as a dict key ``uses`` times: each use hashes the whole tuple."""
    item = pickle.BINUNICODE + struct.pack("<I", 1) + b"a" + pickle.BINPUT + b"\x00" + pickle.POP
    key = pickle.MARK + (pickle.BINGET + b"\x00") * width + pickle.TUPLE + pickle.BINPUT + b"\x01"
    pairs = key + pickle.NONE + (pickle.BINGET + b"\x01" + pickle.NONE) * (uses - 1)
    return pickle.PROTO + b"\x02" + item + pickle.EMPTY_DICT + pickle.MARK + pairs + pickle.SETITEMS + pickle.STOP
