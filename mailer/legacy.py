"""Read the pickles that django-mailer stored, as inert data.

django-mailer 2.x stored ``base64(pickle(EmailMessage))``; releases before
2.0 stored the raw pickle. Unpickling runs whatever a pickle names, and even
a restricted unpickler hands back real classes that a crafted pickle can
then change (its BUILD opcode sets attributes on whatever is on the stack).
So mailer never unpickles. It reads the opcode stream itself
(``pickletools.genops`` parses it; nothing is executed) into a tree of plain
values and records: a global is only a name, and REDUCE, NEWOBJ, INST, OBJ
and BUILD only note what they would have called and with what. Nothing is
ever called and no attribute of any existing object is ever set.

The email is then rebuilt from that tree field by field, accepting only the
shapes django-mailer stored: Django's ``EmailMessage`` and
``EmailMultiAlternatives`` (and the classes in
``MAILER_LEGACY_PICKLE_CLASSES``), their known attributes, attachments and
alternatives, MIME parts, ``SafeString`` (as plain text), bytes, dates.
A pickled email backend (the ``connection`` of mail queued through
``DbBackend``) is dropped unread.

Every read is bounded (``LIMITS``, and ``mailer.mime``'s bounds on the
headers of MIME attachments, 32 KB for a row's attachments in all): a row
past any bound is refused as undecodable, so a crafted row costs at most a
few seconds of CPU and little memory, once (it is set aside).
"""

import _compat_pickle
import base64
import binascii
import contextlib
import datetime
import decimal
import email.charset
import email.header
import email.message
import email.policy
import inspect
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import django
from django.core.mail import EmailAlternative, EmailAttachment, EmailMessage, EmailMultiAlternatives
from django.utils.module_loading import import_string

from mailer import conf
from mailer.compat import detach_connection
from mailer.exceptions import RefusedPickle, UndecodableData
from mailer.mime import MAX_HEADERS_LENGTH, StoredMIMEBase, check_bounds

__all__ = ["LIMITS", "Limits", "is_behaviour", "is_header_value", "loads"]


@dataclass(frozen=True)
class Limits:
    """How much one legacy row may ask of the reader; past any of these it is refused."""

    #: Characters of ``message_data`` (base64 of a pickle, or a raw pickle).
    input_size: int = 64 * 1024 * 1024
    #: Opcodes in the pickle. An email of django-mailer has a few hundred.
    opcodes: int = 200_000
    #: Entries in the pickle's memo.
    memo_size: int = 100_000
    #: Nesting of containers and objects in the rebuilt message.
    depth: int = 100
    #: Characters and bytes in the rebuilt message, counting a value again each
    #: time it is referred to (so shared references cannot multiply it unseen),
    #: beyond the size of the input itself.
    output_slack: int = 1024 * 1024
    #: Containers and objects rebuilt, beyond one for each opcode: a value the
    #: pickle refers to more than once is rebuilt (and counted) each time.
    node_slack: int = 10_000


LIMITS = Limits()


# The pickle, read as a tree --------------------------------------------


@dataclass(frozen=True)
class Global:
    """A name the pickle refers to (GLOBAL, STACK_GLOBAL, INST): only a name."""

    module: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Record:
    """What the pickle would have built by calling something: never called here.

    ``target`` is what it would call (a ``Global``, or another record);
    BUILD, APPENDS and SETITEMS on it only note their arguments.
    """

    target: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] = field(default_factory=dict)
    state: Any = None
    list_items: list[Any] = field(default_factory=list)
    dict_items: list[tuple[Any, Any]] = field(default_factory=list)


def read_tree(raw: bytes, limits: Limits) -> tuple[Any, int]:
    """Return the tree of plain values and records that the pickle ``raw`` describes, and its opcode count.

    Raise UndecodableData if it is not a readable pickle or asks for more
    than ``limits`` allow, RefusedPickle if it uses what no email pickle
    uses (persistent ids, the extension registry).
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    try:
        for count, (opcode, arg, _position) in enumerate(_opcodes(raw), start=1):
            if count > limits.opcodes:
                raise RefusedPickle(f"legacy pickle refused: more than {limits.opcodes} opcodes")
            if opcode.name == "STOP":
                if len(stack) != 1:
                    raise UndecodableData("message data is not a readable pickle: the stack is not one value at STOP")
                return stack[0], count
            _step(opcode.name, arg, stack, marks, memo)
            if len(memo) > limits.memo_size:
                raise RefusedPickle(f"legacy pickle refused: more than {limits.memo_size} memo entries")
    except UndecodableData:
        raise
    except Exception as exc:
        raise UndecodableData(f"message data is not a readable pickle: {type(exc).__name__}: {exc}") from exc
    raise UndecodableData("message data is not a readable pickle: it has no STOP")


def _opcodes(raw: bytes) -> Iterator[tuple[Any, Any, Any]]:
    # genops only parses: it reads each opcode and its argument, runs nothing.
    return pickletools.genops(raw)


def _pop_mark(stack: list[Any], marks: list[int]) -> list[Any]:
    if not marks:
        raise UndecodableData("message data is not a readable pickle: no MARK")
    index = marks.pop()
    items = stack[index:]
    del stack[index:]
    return items


def _pop(stack: list[Any], marks: list[int]) -> Any:
    """Pop the top value; like pickle, never from below the last MARK."""
    if len(stack) <= (marks[-1] if marks else 0):
        raise UndecodableData("message data is not a readable pickle: the stack is too short")
    return stack.pop()


def _top(stack: list[Any], marks: list[int]) -> Any:
    if len(stack) <= (marks[-1] if marks else 0):
        raise UndecodableData("message data is not a readable pickle: the stack is too short")
    return stack[-1]


def _global(module: str, name: str) -> Global:
    # Python 2 names (pickles from before django-mailer 2.0), as pickle maps them.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return Global(module, name)


def _add_items(target: Any, items: list[Any]) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Record):
        target.list_items.extend(items)
    else:
        raise RefusedPickle(f"legacy pickle refused: it appends to a {type(target).__name__}")


# A dict key or set item must hash cheaply: no int past what hashes to
# itself (larger ones can be chosen to collide), short tuples only.
LARGEST_KEY_INT = 2**31
LONGEST_KEY_TUPLE = 4


def _key(value: Any, nested: bool = False) -> Any:
    """Return ``value`` if it may be a dict key or set item: hashing it must stay cheap and shallow."""
    if value is None or isinstance(value, (str, bytes, Global, Record)):
        return value
    if isinstance(value, int) and -LARGEST_KEY_INT < value < LARGEST_KEY_INT:
        return value
    if isinstance(value, tuple) and not nested and len(value) <= LONGEST_KEY_TUPLE:
        for item in value:
            _key(item, nested=True)
        return value
    raise RefusedPickle(f"legacy pickle refused: a {type(value).__name__} of this kind as a dict key or set item")


def _set_items(target: Any, pairs: list[tuple[Any, Any]]) -> None:
    for key, _value in pairs:
        _key(key)
    if isinstance(target, dict):
        for key, value in pairs:
            target[key] = value
    elif isinstance(target, Record):
        target.dict_items.extend(pairs)
    else:
        raise RefusedPickle(f"legacy pickle refused: it sets items on a {type(target).__name__}")


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    if len(items) % 2:
        raise UndecodableData("message data is not a readable pickle: an odd number of dict items")
    return list(zip(items[::2], items[1::2], strict=True))


_PLAIN_VALUES = {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "FLOAT",
    "BINFLOAT",
}


def _step(name: str, arg: Any, stack: list[Any], marks: list[int], memo: dict[int, Any]) -> None:  # noqa: C901 -- one opcode table
    """Apply one opcode to the stack, as pickle would, but building only data and records."""
    if name in _PLAIN_VALUES:
        stack.append(arg)
    elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
        stack.append(_py2_str(arg))
    elif name == "BYTEARRAY8":
        stack.append(bytes(arg))
    elif name == "NONE":
        stack.append(None)
    elif name == "NEWTRUE":
        stack.append(True)
    elif name == "NEWFALSE":
        stack.append(False)
    elif name in ("PROTO", "FRAME"):
        pass
    elif name == "MARK":
        marks.append(len(stack))
    elif name == "POP":
        if marks and marks[-1] == len(stack):
            marks.pop()
        else:
            _pop(stack, marks)
    elif name == "POP_MARK":
        _pop_mark(stack, marks)
    elif name == "DUP":
        stack.append(_top(stack, marks))
    elif name == "EMPTY_LIST":
        stack.append([])
    elif name == "EMPTY_DICT":
        stack.append({})
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name == "EMPTY_SET":
        stack.append(set())
    elif name == "LIST":
        stack.append(_pop_mark(stack, marks))
    elif name == "TUPLE":
        stack.append(tuple(_pop_mark(stack, marks)))
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        items = [_pop(stack, marks) for _ in range(int(name[-1]))]
        stack.append(tuple(reversed(items)))
    elif name == "DICT":
        mapping: dict[Any, Any] = {}
        _set_items(mapping, _pairs(_pop_mark(stack, marks)))
        stack.append(mapping)
    elif name == "FROZENSET":
        stack.append(frozenset(_key(item) for item in _pop_mark(stack, marks)))
    elif name == "APPEND":
        value = _pop(stack, marks)
        _add_items(_top(stack, marks), [value])
    elif name == "APPENDS":
        items = _pop_mark(stack, marks)
        _add_items(_top(stack, marks), items)
    elif name == "SETITEM":
        value = _pop(stack, marks)
        key = _pop(stack, marks)
        _set_items(_top(stack, marks), [(key, value)])
    elif name == "SETITEMS":
        pairs = _pairs(_pop_mark(stack, marks))
        _set_items(_top(stack, marks), pairs)
    elif name == "ADDITEMS":
        items = _pop_mark(stack, marks)
        target = _top(stack, marks)
        if not isinstance(target, set):
            raise RefusedPickle("legacy pickle refused: it adds set items to something not a set")
        target.update(_key(item) for item in items)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = _top(stack, marks)
    elif name == "MEMOIZE":
        memo[len(memo)] = _top(stack, marks)
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[int(arg)])
    elif name == "GLOBAL":
        module, _, global_name = arg.partition(" ")
        stack.append(_global(module, global_name))
    elif name == "STACK_GLOBAL":
        global_name = _pop(stack, marks)
        module = _pop(stack, marks)
        if not (isinstance(module, str) and isinstance(global_name, str)):
            raise UndecodableData("message data is not a readable pickle: STACK_GLOBAL without names")
        stack.append(_global(module, global_name))
    elif name in ("REDUCE", "NEWOBJ"):
        args = _pop(stack, marks)
        target = _pop(stack, marks)
        stack.append(Record(target, _as_args(args)))
    elif name == "NEWOBJ_EX":
        kwargs = _pop(stack, marks)
        args = _pop(stack, marks)
        target = _pop(stack, marks)
        if not isinstance(kwargs, dict):
            raise UndecodableData("message data is not a readable pickle: NEWOBJ_EX without a dict")
        stack.append(Record(target, _as_args(args), kwargs))
    elif name == "INST":
        module, _, global_name = arg.partition(" ")
        stack.append(Record(_global(module, global_name), tuple(_pop_mark(stack, marks))))
    elif name == "OBJ":
        items = _pop_mark(stack, marks)
        if not items:
            raise UndecodableData("message data is not a readable pickle: OBJ without a class")
        stack.append(Record(items[0], tuple(items[1:])))
    elif name == "BUILD":
        state = _pop(stack, marks)
        target = _top(stack, marks)
        if not isinstance(target, Record):
            raise RefusedPickle(f"legacy pickle refused: it sets the state of {_describe(target)}")
        if target.state is not None:
            raise RefusedPickle("legacy pickle refused: it sets the state of one object twice")
        target.state = state
    elif name in ("PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"):
        raise RefusedPickle(f"legacy pickle refused: it uses {name}, which no django-mailer row does")
    else:
        raise UndecodableData(f"message data is not a readable pickle: unknown opcode {name}")


def _as_args(args: Any) -> tuple[Any, ...]:
    if not isinstance(args, tuple):
        raise UndecodableData("message data is not a readable pickle: arguments are not a tuple")
    return args


def _py2_str(value: str) -> str:
    """Return a Python 2 ``str`` of an old pickle as text: UTF-8 if it is, else as it is.

    ``genops`` gives these opcodes' bytes as Latin-1 text.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _describe(value: Any) -> str:
    if isinstance(value, Global):
        return value.path
    if isinstance(value, Record):
        return f"an object made by {_describe(value.target)}"
    return f"a {type(value).__name__}"


# The tree, rebuilt into an email ---------------------------------------

EMAIL_CLASSES = {
    "django.core.mail.message.EmailMessage": EmailMessage,
    "django.core.mail.message.EmailMultiAlternatives": EmailMultiAlternatives,
    "django.core.mail.EmailMessage": EmailMessage,
    "django.core.mail.EmailMultiAlternatives": EmailMultiAlternatives,
}

SAFE_STRINGS = {
    "django.utils.safestring.SafeString",
    "django.utils.safestring.SafeText",
    "django.utils.safestring.SafeUnicode",
    "django.utils.safestring.SafeBytes",
    "django.utils.safestring.SafeData",
}

# Django 5.2's attachments and alternatives, named tuples pickled as (class, fields).
NAMED_TUPLES = {"django.core.mail.message.EmailAttachment", "django.core.mail.message.EmailAlternative"}

# MIME classes that attachments were made of, by what they are read back as.
MIME_CLASSES = {
    "email.message.Message": "message",
    "email.message.EmailMessage": "part",
    "email.message.MIMEPart": "part",
    "django.core.mail.message.SafeMIMEText": "mimebase",
    "django.core.mail.message.SafeMIMEMultipart": "mimebase",
    "django.core.mail.message.SafeMIMEMessage": "mimebase",
}
MIME_MODULE_PREFIX = "email.mime."

# The reconstructors pickle itself names (protocols 0 to 2).
RECONSTRUCTORS = {"copyreg._reconstructor", "copyreg.__newobj__", "copy_reg._reconstructor"}
CODECS_ENCODE = {"_codecs.encode", "codecs.encode"}

# Attributes of Django's email classes, by the check their value must pass.
TEXT_FIELDS = ("subject", "body")
OPTIONAL_TEXT_FIELDS = ("from_email", "encoding")
SUBTYPE_FIELDS = ("content_subtype", "mixed_subtype", "alternative_subtype")
ADDRESS_FIELDS = ("to", "cc", "bcc", "reply_to")
DROPPED_FIELDS = {"connection", "_connection"}

# The charsets the email package knows by name (and so needs no codec search for).
KNOWN_CHARSETS = set(email.charset.CHARSETS) | set(email.charset.ALIASES) | set(email.charset.CODEC_MAP)


class _Rebuilder:
    """Turn a tree from ``read_tree`` into an email, or plain values, checking every step."""

    def __init__(self, budget: int, nodes: int, limits: Limits) -> None:
        self.budget = budget
        self.nodes = nodes
        self.limits = limits
        self.in_progress: set[int] = set()
        # Characters of MIME headers the row's attachments may have in all, counting an attachment again
        # each time the pickle refers to it: rendering them costs time that grows faster than their length.
        self.mime_headers_left = MAX_HEADERS_LENGTH

    # Accounting ---------------------------------------------------------

    def spend(self, amount: int) -> None:
        self.budget -= amount
        if self.budget < 0:
            raise RefusedPickle("legacy pickle refused: it describes more data than the row holds")

    def enter(self, node: Any, depth: int) -> None:
        self.nodes -= 1
        if self.nodes < 0:
            raise RefusedPickle("legacy pickle refused: it refers to the same values over and over")
        if depth > self.limits.depth:
            raise RefusedPickle(f"legacy pickle refused: nested more than {self.limits.depth} deep")
        if id(node) in self.in_progress:
            raise RefusedPickle("legacy pickle refused: it contains itself")
        self.in_progress.add(id(node))

    def leave(self, node: Any) -> None:
        self.in_progress.discard(id(node))

    # Values -------------------------------------------------------------

    def value(self, node: Any, depth: int = 0) -> Any:
        """Rebuild any value an email may hold: plain data, text, bytes, dates, emails, MIME parts."""
        if node is None or isinstance(node, (bool, float)):
            self.spend(1)
            return node
        if isinstance(node, int):
            self.spend(1 + node.bit_length() // 8)
            return node
        if isinstance(node, (str, bytes)):
            self.spend(len(node) + 1)
            return node
        self.enter(node, depth)
        try:
            if isinstance(node, list):
                self.spend(1)
                return [self.value(item, depth + 1) for item in node]
            if isinstance(node, tuple):
                self.spend(1)
                return tuple(self.value(item, depth + 1) for item in node)
            if isinstance(node, dict):
                self.spend(1)
                return {self.key(key, depth + 1): self.value(item, depth + 1) for key, item in node.items()}
            if isinstance(node, Record):
                return self.record(node, depth)
            raise RefusedPickle(f"legacy pickle refused: {_describe(node)} is not part of an email")
        finally:
            self.leave(node)

    def key(self, node: Any, depth: int) -> Any:
        key = self.value(node, depth)
        if not isinstance(key, (str, int, bytes, tuple)):
            raise RefusedPickle(f"legacy pickle refused: a {type(key).__name__} as a dict key")
        return key

    def text(self, node: Any, where: str, depth: int) -> str:
        value = self.value(node, depth)
        if not isinstance(value, str):
            raise RefusedPickle(f"legacy pickle refused: {where} is a {type(value).__name__}, not text")
        return value

    def record(self, node: Record, depth: int) -> Any:
        path = self.target_path(node)
        if path in RECONSTRUCTORS:
            return self.reconstructed(node, depth)
        if path in CODECS_ENCODE:
            return self.encoded_bytes(node, depth)
        if path in SAFE_STRINGS:
            return self.safe_string(node, depth)
        if path in ("builtins.bytearray", "builtins.bytes") and len(node.args) == 1:
            content = self.value(node.args[0], depth + 1)
            if isinstance(content, bytes):
                return content
        if path in NAMED_TUPLES:
            return tuple(self.value(arg, depth + 1) for arg in node.args)
        if path == "collections.OrderedDict":
            pairs = [self.value(pair, depth + 1) for pair in node.dict_items]
            return {self.key(key, depth + 1): value for key, value in pairs}
        if path in DATE_TYPES:
            return self.date(node, path, depth)
        if path == "email.header.Header":
            return self.header(node, depth)
        if path == "email.headerregistry._reconstruct_header" and len(node.args) == 3:
            # (class name, base classes, the header's text); the state is a parse tree.
            return self.text(node.args[2], "a header", depth + 1)
        if path in EMAIL_CLASSES or path in _legacy_classes():
            return self.email_message(node, path, depth)
        if path in MIME_CLASSES or path.startswith(MIME_MODULE_PREFIX):
            return self.mime(node, path, depth)
        raise RefusedPickle(f"legacy pickle refused: it asks for {path}")

    def target_path(self, node: Record) -> str:
        if isinstance(node.target, Global):
            return node.target.path
        raise RefusedPickle(f"legacy pickle refused: it calls {_describe(node.target)}")

    def reconstructed(self, node: Record, depth: int) -> Any:
        """``copyreg`` rebuilds an object of the class given first: read it as that class's record."""
        return self.value(self.resolved(node), depth + 1)

    def resolved(self, node: Any) -> Any:
        """Return ``node`` with a ``copyreg`` reconstructor (protocols 0 and 1) replaced by the record it makes."""
        if not (isinstance(node, Record) and isinstance(node.target, Global) and node.target.path in RECONSTRUCTORS):
            return node
        if not node.args or not isinstance(node.args[0], Global):
            raise RefusedPickle("legacy pickle refused: copyreg without a class")
        rest = node.args[1:]
        if node.target.path == "copyreg.__newobj__":
            args = rest
        else:
            # _reconstructor(cls, base, state): state is the base's value (str for SafeString).
            args = (rest[1],) if len(rest) == 2 and rest[1] is not None else ()
            if args and isinstance(rest[0], Global) and rest[0].path == "builtins.tuple":
                args = _as_args(rest[1])  # a named tuple: its fields
        return Record(node.args[0], args, node.kwargs, node.state, node.list_items, node.dict_items)

    def encoded_bytes(self, node: Record, depth: int) -> bytes:
        """How protocol 2 stores bytes: ``_codecs.encode(text, "latin1")``; no other codec."""
        if len(node.args) == 2 and node.args[1] in ("latin1", "latin-1"):
            text = self.text(node.args[0], "bytes", depth + 1)
            return text.encode("latin-1")
        raise RefusedPickle("legacy pickle refused: codecs.encode other than latin-1 text to bytes")

    def safe_string(self, node: Record, depth: int) -> str:
        """A ``SafeString`` (what ``render_to_string`` returns) is read as plain text: nothing is trusted as HTML."""
        if len(node.args) != 1:
            raise RefusedPickle("legacy pickle refused: a SafeString without its text")
        value = self.value(node.args[0], depth + 1)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if not isinstance(value, str):
            raise RefusedPickle("legacy pickle refused: a SafeString without its text")
        return value

    def date(self, node: Record, path: str, depth: int) -> Any:
        args = [self.value(arg, depth + 1) for arg in node.args]
        allowed = (bytes, int, str, datetime.timedelta, datetime.timezone, type(None))
        if len(args) > 8 or not all(isinstance(arg, allowed) for arg in args):
            raise RefusedPickle(f"legacy pickle refused: unexpected arguments to {path}")
        try:
            return DATE_TYPES[path](*args)
        except (TypeError, ValueError, decimal.InvalidOperation) as exc:
            raise RefusedPickle(f"legacy pickle refused: bad arguments to {path}: {exc}") from exc

    def header(self, node: Record, depth: int) -> str:
        """An ``email.header.Header`` value, as the text it stands for."""
        state = self.state_dict(node)
        chunks = state.get("_chunks", [])
        header = email.header.Header()
        if not isinstance(chunks, list):
            raise RefusedPickle("legacy pickle refused: a Header without its chunks")
        for chunk in chunks:
            if not (isinstance(chunk, tuple) and len(chunk) == 2):
                raise RefusedPickle("legacy pickle refused: a Header chunk is not (text, charset)")
            text = self.text(chunk[0], "a Header chunk", depth + 1)
            header.append(text, self.charset(chunk[1], depth + 1) or "us-ascii")
        return str(header)

    def state_dict(self, node: Record) -> dict[str, Any]:
        state = node.state
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict, slots) with no slots
        if state is None:
            return {}
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise RefusedPickle(f"legacy pickle refused: the state of a {self.target_path(node)} is not a dict")
        return state

    def charset(self, node: Any, depth: int) -> str | None:
        """A charset, given as a name or as a pickled ``email.charset.Charset``: return its name.

        Only the charsets the ``email`` package knows by name are read: any
        other name would make the codec machinery look for (import) a codec.
        """
        node = self.resolved(node)
        if node is None or isinstance(node, str):
            name = node
        elif isinstance(node, Record) and self.target_path(node) == "email.charset.Charset":
            name = self.state_dict(node).get("input_charset")
        else:
            raise RefusedPickle("legacy pickle refused: a charset is neither a name nor a Charset")
        if name is None:
            return None
        if not (isinstance(name, str) and name.lower() in KNOWN_CHARSETS):
            raise RefusedPickle(f"legacy pickle refused: a charset the email package does not know: {name!r:.40}")
        self.spend(len(name))
        return name

    # Emails -------------------------------------------------------------

    def email_message(self, node: Record, path: str, depth: int) -> EmailMessage:
        cls = EMAIL_CLASSES.get(path) or _import_legacy_class(path)
        message = cls()
        detach_connection(message)
        for name, item in self.state_dict(node).items():
            if name in DROPPED_FIELDS:
                continue  # a pickled backend: never read
            if isinstance(item, (Global, Record)) and _is_extra(cls, name):
                # An object of the site's class beyond plain data (django-anymail's
                # UNSET marker, its AnymailStatus): keep the constructor's default.
                with contextlib.suppress(RefusedPickle):
                    setattr(message, name, self.email_field(cls, name, item, depth + 1))
                continue
            setattr(message, name, self.email_field(cls, name, item, depth + 1))
        if isinstance(message, EmailMultiAlternatives):
            message.alternatives = [EmailAlternative(*item) for item in message.alternatives]
        message.attachments = [
            EmailAttachment(*item) if isinstance(item, tuple) else item for item in message.attachments
        ]
        return message

    def email_field(self, cls: type[EmailMessage], name: str, node: Any, depth: int) -> Any:
        if name in TEXT_FIELDS:
            return "" if node is None else self.text(node, name, depth)
        if name in OPTIONAL_TEXT_FIELDS:
            return None if node is None else self.text(node, name, depth)
        if name in SUBTYPE_FIELDS:
            return self.text(node, name, depth)
        if name in ADDRESS_FIELDS:
            return self.addresses(node, name, depth)
        if name == "extra_headers":
            return self.headers(node, depth)
        if name == "attachments":
            return [self.attachment(item, depth + 1) for item in self.sequence(node, name)]
        if name == "alternatives" and issubclass(cls, EmailMultiAlternatives):
            return [self.alternative(item, depth + 1) for item in self.sequence(node, name)]
        if _is_extra(cls, name):
            value = self.value(node, depth)
            if isinstance(value, (EmailMessage, email.message.Message)):
                raise RefusedPickle(f"legacy pickle refused: {name} holds a message")
            return value  # an attribute of the site's own class, as plain data
        raise RefusedPickle(f"legacy pickle refused: {cls.__name__} has no attribute {name!r}")

    def sequence(self, node: Any, where: str) -> list[Any]:
        if isinstance(node, (list, tuple)):
            return list(node)
        raise RefusedPickle(f"legacy pickle refused: {where} is not a list")

    def addresses(self, node: Any, where: str, depth: int) -> list[str]:
        if isinstance(node, str):
            raise RefusedPickle(f"legacy pickle refused: {where} is a string, not a list of addresses")
        return [self.text(item, where, depth + 1) for item in self.sequence(node, where)]

    def headers(self, node: Any, depth: int) -> dict[str, str | int]:
        if not isinstance(node, dict):
            raise RefusedPickle("legacy pickle refused: extra_headers is not a dict")
        headers: dict[str, str | int] = {}
        for key, item in node.items():
            name = self.text(key, "a header name", depth + 1)
            value = self.value(item, depth + 1)
            if not is_header_value(value):
                raise RefusedPickle(f"legacy pickle refused: header {name} is not text")
            headers[name] = value
        self.spend(1)
        return headers

    def attachment(self, node: Any, depth: int) -> Any:
        item = self.value(node, depth)
        if isinstance(item, email.message.Message):
            self.mime_headers_left -= sum(len(str(value)) for part in item.walk() for _name, value in part.raw_items())
            if self.mime_headers_left < 0:
                raise RefusedPickle(
                    f"legacy pickle refused: its MIME attachments have more than {MAX_HEADERS_LENGTH} "
                    "characters of headers in all"
                )
            try:
                check_bounds(item)
                item.as_bytes()  # what sending will do; a part that cannot be rendered is refused now
            except Exception as exc:
                raise RefusedPickle(
                    f"legacy pickle refused: a MIME attachment cannot be rendered: {exc!r:.200}"
                ) from exc
            return item
        if not (isinstance(item, tuple) and len(item) == 3):
            raise RefusedPickle("legacy pickle refused: an attachment is neither (name, content, type) nor MIME")
        filename, content, mimetype = item
        if not (
            isinstance(filename, (str, type(None)))
            and isinstance(content, (str, bytes, EmailMessage, email.message.Message))
            and isinstance(mimetype, (str, type(None)))
        ):
            raise RefusedPickle("legacy pickle refused: an attachment of unexpected types")
        return item

    def alternative(self, node: Any, depth: int) -> tuple[str | bytes, str]:
        item = self.value(node, depth)
        if not (isinstance(item, tuple) and len(item) == 2):
            raise RefusedPickle("legacy pickle refused: an alternative is not (content, mimetype)")
        content, mimetype = item
        if not (isinstance(content, (str, bytes)) and isinstance(mimetype, str)):
            raise RefusedPickle("legacy pickle refused: an alternative of unexpected types")
        return content, mimetype

    # MIME ---------------------------------------------------------------

    def mime_part(self, node: Record, depth: int) -> email.message.Message:
        part = self.value(node, depth)
        if not isinstance(part, email.message.Message):
            raise RefusedPickle("legacy pickle refused: an attachment is neither (name, content, type) nor MIME")
        return part

    def mime(self, node: Record, path: str, depth: int) -> email.message.Message:
        """Rebuild a MIME object from its pickled state: headers, payload, charset; nothing else."""
        state = self.state_dict(node)
        kind = MIME_CLASSES.get(path, "mimebase")
        policy_node = self.resolved(state.get("policy"))
        if isinstance(policy_node, Record) and self.target_path(policy_node).startswith("email.policy."):
            kind = "part"
        part: email.message.Message
        if kind == "part":
            part = email.message.MIMEPart(policy=email.policy.default)
        elif kind == "mimebase":
            part = StoredMIMEBase()
        else:
            part = email.message.Message(policy=email.policy.compat32)
        headers = self.sequence(state.get("_headers", []), "MIME headers")
        for header in headers:
            if not (isinstance(header, tuple) and len(header) == 2):
                raise RefusedPickle("legacy pickle refused: a MIME header is not (name, value)")
            part._headers.append(  # type: ignore[attr-defined]  # the parser fills it the same way
                (
                    self.text(header[0], "a MIME header name", depth + 1),
                    self.text(header[1], "a MIME header", depth + 1),
                )
            )
        payload = state.get("_payload")
        if isinstance(payload, list):
            if part.get_content_maintype() not in ("multipart", "message"):
                raise RefusedPickle("legacy pickle refused: a list of parts in a part that is not multipart")
            part._payload = [self.mime_part(item, depth + 1) for item in payload]  # type: ignore[attr-defined]
        elif payload is not None:
            part._payload = self.text(payload, "a MIME payload", depth + 1)  # type: ignore[attr-defined]
        charset = self.charset(state.get("_charset"), depth + 1)
        if charset is not None:
            part._charset = email.charset.Charset(charset)  # type: ignore[attr-defined]
        for name in ("preamble", "epilogue", "_default_type"):
            if state.get(name) is not None:
                setattr(part, name, self.text(state[name], name, depth + 1))
        return part


DATE_TYPES: dict[str, Any] = {
    "datetime.datetime": datetime.datetime,
    "datetime.date": datetime.date,
    "datetime.time": datetime.time,
    "datetime.timedelta": datetime.timedelta,
    "datetime.timezone": datetime.timezone,
    "decimal.Decimal": decimal.Decimal,
}


def _is_extra(cls: type[EmailMessage], name: str) -> bool:
    """Return whether ``name`` may be an attribute that a listed subclass adds to Django's."""
    known = TEXT_FIELDS + OPTIONAL_TEXT_FIELDS + SUBTYPE_FIELDS + ADDRESS_FIELDS + ("extra_headers", "attachments")
    return (
        cls not in EMAIL_CLASSES.values()
        and name not in known
        and name != "alternatives"
        and name.isidentifier()
        and not is_behaviour(cls, name)
    )


def is_header_value(value: Any) -> bool:
    """Return whether ``value`` may be the value of an extra header.

    Text; a number, which Django 5.2 writes out; a datetime, which Django 6 writes as a date.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return django.VERSION < (6, 0) and -(2**63) < value < 2**63  # Django 6 refuses a number
    return isinstance(value, (str, datetime.datetime))


def is_behaviour(cls: type, name: str) -> bool:
    """Return whether ``name`` is code on ``cls`` (a method, a property) that data must not replace."""
    if name.startswith("__"):
        return True
    found = inspect.getattr_static(cls, name, None)
    return callable(found) or isinstance(found, (property, staticmethod, classmethod)) or hasattr(found, "__get__")


def _legacy_classes() -> set[str]:
    return set(conf.get_setting("MAILER_LEGACY_PICKLE_CLASSES"))


def _import_legacy_class(path: str) -> type[EmailMessage]:
    """Import a class the site listed in ``MAILER_LEGACY_PICKLE_CLASSES``: the site's own code, trusted."""
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise UndecodableData(f"MAILER_LEGACY_PICKLE_CLASSES names {path}, which cannot be imported") from exc
    if not (isinstance(cls, type) and issubclass(cls, EmailMessage)):
        raise RefusedPickle(f"MAILER_LEGACY_PICKLE_CLASSES names {path}, which is not an EmailMessage class")
    return cls


# The way in --------------------------------------------------------------


def loads(data: str | bytes, limits: Limits | None = None) -> Any:
    """Read a django-mailer row: base64 of a pickle, or (before 2.0) the pickle itself.

    ``data`` is the text of the column, or bytes (a pickle as ``pickle.dumps``
    returns it, which django-mailer's ``db_to_email`` also took). Return the
    email (or the plain value) it holds. Raise RefusedPickle when it asks for
    what no email is made of or passes a bound of ``limits`` (``LIMITS`` by
    default), and UndecodableData when it is not a pickle at all.
    """
    limits = limits or LIMITS
    if len(data) > limits.input_size:
        raise RefusedPickle(f"legacy pickle refused: message data is larger than {limits.input_size} characters")
    try:
        raw = base64.b64decode(data if isinstance(data, bytes) else data.encode("ascii"))
        tree, opcodes = read_tree(raw, limits)
    except RefusedPickle:
        raise
    except (UnicodeEncodeError, binascii.Error, UndecodableData):
        try:
            raw = data if isinstance(data, bytes) else data.encode("latin-1")
            tree, opcodes = read_tree(raw, limits)
        except RefusedPickle:
            raise
        except (UnicodeEncodeError, UndecodableData) as exc:
            raise UndecodableData("message data is neither JSON nor a django-mailer pickle") from exc
    rebuilder = _Rebuilder(budget=len(raw) + limits.output_slack, nodes=opcodes + limits.node_slack, limits=limits)
    return rebuilder.value(tree)
