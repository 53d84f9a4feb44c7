"""How a message is stored in ``message_data``: versioned JSON, never pickle.

A stored message is a JSON object::

    {"mailer": 1, "email": {"class": "django.core.mail.message.EmailMessage",
                            "subject": "...", "to": [...], "attachments": [...], ...}}

It is exact: every field of Django's ``EmailMessage`` and
``EmailMultiAlternatives`` survives the trip, and so do the extra attributes
of subclasses (django-anymail's ``AnymailMessage``) as long as they are plain
data. Whatever cannot be stored exactly is refused when the message is
queued, with an error that names it.

Values that JSON cannot hold are tagged: ``{"$bytes": base64}``,
``{"$tuple": [...]}``, ``{"$datetime": iso}``, ``{"$mime": ...}`` and so on.

django-mailer stored the pickled ``EmailMessage`` (base64-encoded since 2.0,
raw before). Such rows still decode, through ``mailer.legacy``, which admits
only email classes and plain containers.
"""

import binascii
import codecs
import datetime
import decimal
import email.message
import email.parser
import email.policy
import json
from collections.abc import Callable
from email.mime.base import MIMEBase
from typing import Any

import django
from django.core.mail import EmailAlternative, EmailAttachment, EmailMessage, EmailMultiAlternatives
from django.utils.functional import Promise
from django.utils.module_loading import import_string

from mailer import conf, legacy
from mailer.addresses import render_problem
from mailer.compat import detach_connection
from mailer.exceptions import UndecodableData, UnstorableEmail
from mailer.message_id import get_message_id
from mailer.mime import StoredMIMEBase, check_bounds, check_message_source, check_source_bounds, is_message_type

__all__ = [
    "FORMAT_VERSION",
    "SEARCH_COLUMNS",
    "StoredMIMEBase",
    "UndecodableData",
    "UnstorableEmail",
    "db_to_email",
    "decode",
    "email_classes",
    "check_email",
    "email_to_db",
    "is_legacy",
    "search_columns",
]

FORMAT_VERSION = 1

# The largest message_data read back: a 25 MB attachment is about 34 million
# characters of base64. A larger row is refused before it is parsed.
MAX_DATA_SIZE = 64 * 1024 * 1024

# How deep a stored value may nest (lists in dicts in lists...).
MAX_DEPTH = 100

# How many attachments and alternatives a message may have, with those of the emails attached to it: Django
# renders each in about half a millisecond, so that a row of tiny ones would take a worker for minutes.
MAX_ATTACHMENTS = 1000

# The attributes of Django's EmailMessage and EmailMultiAlternatives, stored
# by name; any other instance attribute is an "extra" of a subclass.
EMAIL_FIELDS = (
    "subject",
    "body",
    "from_email",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "extra_headers",
    "encoding",
    "content_subtype",
    "mixed_subtype",
    "alternative_subtype",
)
NOT_STORED = {"connection", "_connection", "attachments"}
# Django 5.2's, removed in 6.0 (which refuses an email that sets them): stored only when the email set its own,
# and the defaults that rows stored on 5.2 hold are left out when read on 6.0 and later.
REMOVED_SUBTYPES = {"mixed_subtype": "mixed", "alternative_subtype": "alternative"}
_KNOWN_ATTRIBUTES = frozenset(EMAIL_FIELDS) | NOT_STORED
_KNOWN_ATTRIBUTES_WITH_ALTERNATIVES = _KNOWN_ATTRIBUTES | {"alternatives"}

# The classes a stored message may name, besides MAILER_EMAIL_CLASSES.
DEFAULT_EMAIL_CLASSES = {
    "django.core.mail.message.EmailMessage",
    "django.core.mail.message.EmailMultiAlternatives",
    "anymail.message.AnymailMessage",
}


# One encoder for every message: json.dumps with arguments makes one per call.
# A document holds only containers made for it, and lists and dicts of text
# (``_encode_value``): it cannot hold itself, so there is nothing to watch for.
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def email_to_db(value: Any) -> str:
    """Encode ``value`` (an ``EmailMessage``, or any plain value) as text for ``message_data``."""
    if isinstance(value, EmailMessage):
        document = {"mailer": FORMAT_VERSION, "email": _encode_email(value, "email")}
    else:
        document = {"mailer": FORMAT_VERSION, "value": _encode_value(value, "value")}
    if isinstance(value, EmailMessage) and attachments_in(value) > MAX_ATTACHMENTS:
        raise UnstorableEmail(
            f"the message has more than {MAX_ATTACHMENTS} attachments and alternatives (with those of the emails "
            "attached to it): it could not be read back in bounded time"
        )
    # ASCII only, as django-mailer's base64 was: MySQL tables in the old
    # three-byte "utf8" charset cannot hold every character.
    text = _JSON.encode(document)
    if len(text) > MAX_DATA_SIZE:
        raise UnstorableEmail(
            f"the message is {len(text)} characters once stored, more than mailer reads back ({MAX_DATA_SIZE})"
        )
    return text


def db_to_email(data: str | bytes | None) -> Any:
    """Decode ``message_data``; return None when it is empty, unreadable or refused."""
    try:
        return decode(data)
    except UndecodableData:
        return None


def decode(data: str | bytes | None) -> Any:
    """Decode ``message_data``; return None when it is empty, raise UndecodableData when it cannot be decoded.

    A decoded email has the shape the engine relies on (``check_email``),
    whatever the row held.
    """
    if not data:
        return None
    if len(data) > MAX_DATA_SIZE:
        raise UndecodableData(f"message data is larger than {MAX_DATA_SIZE} characters")
    try:
        if isinstance(data, bytes):
            # A pickle in bytes (django-mailer before 2.0 stored it raw) is read as the bytes it is:
            # decoding it as text would change it.
            is_json = data.lstrip().startswith(b"{")
            value = _decode_document(data.decode("utf-8", "surrogateescape")) if is_json else legacy.loads(data)
        else:
            value = _decode_document(data) if not is_legacy(data) else legacy.loads(data)
        if isinstance(value, EmailMessage):
            check_email(value)
            _require(
                attachments_in(value) <= MAX_ATTACHMENTS,
                f"more than {MAX_ATTACHMENTS} attachments and alternatives, with those of attached emails",
            )
    except UndecodableData:
        raise
    except Exception as exc:  # a row must never crash its reader: whatever it holds, say why
        raise UndecodableData(f"message data is damaged: {type(exc).__name__}: {exc}") from exc
    return value


def check_email(message: EmailMessage) -> None:
    """Raise UndecodableData unless every field of ``message`` has the type Django gives it.

    Rows are data from outside: a row with ``cc=None`` or a list of headers
    is refused here, with the field named, rather than crashing later.
    """
    for name in ("subject", "body"):
        _require(isinstance(getattr(message, name), str) and _encodable(getattr(message, name)), f"{name} is not text")
    # Django 6 writes out a subject that ends with a line break (one made with render_to_string); 5.2 refuses it.
    one_line = message.subject.rstrip("\r\n") if django.VERSION >= (6, 0) else message.subject
    _require("\n" not in one_line and "\r" not in one_line, "subject contains a line break")
    _require(isinstance(message.from_email, (str, type(None))), "from_email is not text")
    _require(message.encoding is None or _is_text_encoding(message.encoding), "encoding is not a text encoding")
    for name in ("content_subtype", "mixed_subtype", "alternative_subtype"):
        _require(isinstance(getattr(message, name, ""), str), f"{name} is not text")
    for name in ("to", "cc", "bcc", "reply_to"):
        addresses = getattr(message, name)
        _require(isinstance(addresses, list), f"{name} is not a list")
        _require(all(isinstance(address, str) for address in addresses), f"{name} holds something not text")
    headers = message.extra_headers
    _require(isinstance(headers, dict), "extra_headers is not a dict")
    _require(all(isinstance(name, str) for name in headers), "a header name is not text")
    _require(all(legacy.is_header_value(value) for value in headers.values()), "a header value is not text")
    # Within what the email package renders in bounded time: sending must not take a worker for hours.
    problem = render_problem(message)
    _require(problem is None, str(problem))
    _require(isinstance(message.attachments, list), "attachments is not a list")
    for attachment in message.attachments:
        if isinstance(attachment, email.message.Message):
            try:
                check_bounds(attachment)
                attachment.as_bytes()  # as sending will; a part that cannot be rendered is refused now
            except Exception as exc:
                raise UndecodableData(
                    f"message data is damaged: a MIME attachment cannot be rendered: {exc!r:.200}"
                ) from exc
            continue
        _require(isinstance(attachment, tuple) and len(attachment) == 3, "an attachment is not (name, content, type)")
        filename, content, mimetype = attachment
        _require(
            filename is None or (isinstance(filename, str) and "\n" not in filename and "\r" not in filename),
            "an attachment name is not one line of text",
        )
        _require(
            isinstance(content, (str, bytes, EmailMessage, email.message.Message)),
            "an attachment's content is neither text, bytes nor a message",
        )
        _require(
            mimetype is None or (isinstance(mimetype, str) and "/" in mimetype), "an attachment's type is not a type"
        )
        if isinstance(content, EmailMessage):
            check_email(content)
        elif isinstance(content, email.message.Message):
            try:
                check_bounds(content)
            except ValueError as exc:
                raise UndecodableData(f"message data is damaged: {exc}") from exc
        elif is_message_type(mimetype) and isinstance(content, (str, bytes)):
            _check_source_when_read(content)
    if isinstance(message, EmailMultiAlternatives):
        _require(isinstance(message.alternatives, list), "alternatives is not a list")
        for alternative in message.alternatives:
            _require(
                isinstance(alternative, tuple)
                and len(alternative) == 2
                and isinstance(alternative[0], (str, bytes))
                and isinstance(alternative[1], str),
                "an alternative is not (content, mimetype)",
            )
            if is_message_type(alternative[1]) and isinstance(alternative[0], (str, bytes)):
                _check_source_when_read(alternative[0])


def _check_source_when_read(content: str | bytes) -> None:
    try:
        check_message_source(content)
    except ValueError as exc:
        raise UndecodableData(f"message data is damaged: {exc}") from exc


def attachments_in(message: EmailMessage) -> int:
    """How many attachments and alternatives ``message`` has, with those of the emails attached to it (which
    stand no deeper than ``MAX_DEPTH``: the codec refuses deeper ones).
    """
    count = len(message.attachments) + len(getattr(message, "alternatives", None) or ())
    for attachment in message.attachments:
        if isinstance(attachment, tuple) and len(attachment) == 3 and isinstance(attachment[1], EmailMessage):
            count += attachments_in(attachment[1])
    return count


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no mail can carry it
        return False
    return True


def _is_text_encoding(name: Any) -> bool:
    if not isinstance(name, str) or len(name) > 40:
        return False
    try:
        return codecs.lookup(name)._is_text_encoding
    except LookupError:
        return False


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise UndecodableData(f"message data is damaged: {problem}")


# The fields of ``Message`` that copy parts of its email, for searching. The subject's is
# ``subject_copy`` (in the column "subject"): ``Message.subject`` is django-mailer's property.
SEARCH_COLUMNS = ("subject_copy", "from_email", "recipients", "message_id")


def search_columns(value: Any) -> dict[str, str | None]:
    """Return what the searchable fields hold for an email: subject, sender, recipients, Message-ID."""
    if not isinstance(value, EmailMessage):
        return {"subject_copy": "", "from_email": "", "recipients": "", "message_id": None}
    message_id = get_message_id(value)
    columns = {
        "subject_copy": str(value.subject or ""),
        "from_email": str(value.from_email or ""),
        "recipients": ", ".join(map(str, value.recipients())),
        "message_id": str(message_id) if message_id is not None else None,
    }
    return {name: storable_text(text) for name, text in columns.items()}


def storable_text(text: str | None) -> str | None:
    """Return ``text`` as every database can store it: NULs (PostgreSQL refuses them) dropped, lone
    surrogates (no encoding accepts them) written as ``\\udcxx`` escapes.

    For copies and log texts only: a row that cannot be stored stops nothing.
    """
    if not text:
        return text
    if type(text) is str and text.isascii() and "\x00" not in text:
        return text  # nearly every text: nothing to change
    return text.replace("\x00", "").encode("utf-8", "backslashreplace").decode("utf-8")


def is_legacy(data: str | None) -> bool:
    """Return whether ``message_data`` is in django-mailer's pickle format."""
    return data is not None and data != "" and not data.lstrip().startswith("{")


def _decode_document(data: str) -> Any:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UndecodableData(f"message data is not valid JSON: {type(exc).__name__}: {exc}") from exc
    version = document.get("mailer") if isinstance(document, dict) else None
    if version != FORMAT_VERSION:
        raise UndecodableData(f"message data is not in a format this version knows (mailer={version!r})")
    try:
        if "email" in document:
            return _decode_email(document["email"])
        return _decode_value(document["value"])
    except UndecodableData:
        raise
    except Exception as exc:
        raise UndecodableData(f"message data is damaged: {type(exc).__name__}: {exc}") from exc


# Encoding ---------------------------------------------------------------


def _encode_email(message: EmailMessage, where: str, depth: int = 0) -> dict[str, Any]:
    """``message`` as JSON-ready data; ``depth``: how deep the decoder will find it (``_decode_email``), which
    refuses what stands deeper than ``MAX_DEPTH``.
    """
    cls = type(message)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if path not in DEFAULT_EMAIL_CLASSES and path not in email_classes():  # the first test spares reading settings
        raise UnstorableEmail(f"{where} is a {path}: add it to MAILER_EMAIL_CLASSES to queue it")
    encoded: dict[str, Any] = {"class": path}
    for name in EMAIL_FIELDS:
        value = getattr(message, name, _MISSING)
        if value is _MISSING or (name in REMOVED_SUBTYPES and name not in vars(message)):
            continue
        # Most fields are text or lists of addresses: spare them the call, and the name of where they are.
        plain = type(value) is str or (type(value) is list and all(type(item) is str for item in value))
        if plain and depth + 2 <= MAX_DEPTH:
            encoded[name] = value
        else:
            encoded[name] = _encode_value(value, f"{where}.{name}", depth + 1)
    encoded["attachments"] = [
        _encode_attachment(item, f"{where}.attachments[{index}]", depth + 1)
        for index, item in enumerate(message.attachments)
    ]
    if isinstance(message, EmailMultiAlternatives):
        encoded["alternatives"] = [
            _encode_alternative(content, mimetype, f"{where}.alternatives[{index}]", depth + 1)
            for index, (content, mimetype) in enumerate(message.alternatives)
        ]
    extras = _extra_attributes(message)
    for name in extras:
        if legacy.is_behaviour(cls, name):
            raise UnstorableEmail(f"{where}.{name} replaces a method or property of {path}: it cannot be stored")
    if extras:
        encoded["extra"] = {name: _encode_value(value, f"{where}.{name}", depth + 1) for name, value in extras.items()}
    return encoded


def _encode_alternative(content: Any, mimetype: Any, where: str, depth: int) -> dict[str, Any]:
    if is_message_type(mimetype) and isinstance(content, (str, bytes)):
        _check_message_source(content, where)
    return {"content": _encode_value(content, where, depth), "mimetype": _encode_value(mimetype, where, depth)}


def _check_message_source(content: str | bytes, where: str) -> None:
    try:
        check_message_source(content)
    except ValueError as exc:
        raise UnstorableEmail(f"{where}: {exc}: it could not be read back in bounded time") from exc


def _extra_attributes(message: EmailMessage) -> dict[str, Any]:
    """Return the instance attributes a subclass added, less those still at their constructor default.

    Defaults need not be stored (decoding calls the constructor again), and
    some are not plain data: django-anymail's ``UNSET`` markers and its empty
    ``AnymailStatus``.
    """
    known = _KNOWN_ATTRIBUTES_WITH_ALTERNATIVES if isinstance(message, EmailMultiAlternatives) else _KNOWN_ATTRIBUTES
    extras = {name: value for name, value in vars(message).items() if name not in known}
    if not extras:
        return {}
    try:
        defaults = vars(type(message)())
    except Exception:
        return extras
    return {name: value for name, value in extras.items() if not _is_default(value, defaults.get(name, _MISSING))}


_MISSING = object()


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if default is _MISSING or type(value) is not type(default):
        return False
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return bool(vars(value) == vars(default))
    try:
        return bool(value == default) and _is_plain(value)
    except Exception:
        return False


def _is_plain(value: Any) -> bool:
    try:
        _encode_value(value, "")
    except UnstorableEmail:
        return False
    return True


def _encode_attachment(item: Any, where: str, depth: int) -> dict[str, Any]:
    if isinstance(item, email.message.Message):
        return {"mime": _encode_mime(item)}
    try:
        filename, content, mimetype = item
    except (TypeError, ValueError) as exc:
        raise UnstorableEmail(f"{where} is neither a (filename, content, mimetype) triple nor a MIME part") from exc
    if isinstance(content, EmailMessage):  # an attached email: reading it back checks it as the message itself
        problem = render_problem(content)
        if problem is not None:
            raise UnstorableEmail(f"{where}: {problem}: it could not be read back in bounded time")
    elif is_message_type(mimetype) and isinstance(content, (str, bytes)):
        _check_message_source(content, where)
    return {
        "filename": _encode_value(filename, where, depth),
        "content": _encode_value(content, where, depth),
        "mimetype": _encode_value(mimetype, where, depth),
    }


def _encode_mime(part: email.message.Message) -> dict[str, Any]:
    """Store a MIME object as the bytes it renders to, with the family it belongs to."""
    if isinstance(part, email.message.MIMEPart):
        kind = "part"
    elif isinstance(part, MIMEBase):
        kind = "mimebase"
    else:
        kind = "message"
    try:
        check_bounds(part)  # as reading it back will
    except ValueError as exc:
        raise UnstorableEmail(f"{exc}: it could not be read back in bounded time") from exc
    data = part.as_bytes()
    return {"kind": kind, "bytes": _to_base64(data)}


def _encode_value(value: Any, where: str, depth: int = 0) -> Any:
    """Return ``value`` as JSON-ready data, tagging what JSON cannot hold; ``depth``: how deep the decoder will
    find it (``_decode_value``), which refuses what stands deeper than ``MAX_DEPTH``.
    """
    if depth > MAX_DEPTH:
        raise UnstorableEmail(f"{where} is nested more than {MAX_DEPTH} deep: it could not be read back")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"$float": repr(value)}
        return value
    if isinstance(value, Promise):
        return str(value)  # lazy translations are resolved when queued
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": _to_base64(value)}
    if isinstance(value, list):
        if depth < MAX_DEPTH and all(type(item) is str for item in value):
            return value  # addresses: nothing to tag
        return [_encode_value(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_value(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]}
    if isinstance(value, dict):
        return _encode_dict(value, where, depth)
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"$date": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"$time": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, EmailMessage):
        return {"$email": _encode_email(value, where, depth + 1)}
    if isinstance(value, email.message.Message):
        return {"$mime": _encode_mime(value)}
    raise UnstorableEmail(
        f"{where} cannot be stored: a {type(value).__module__}.{type(value).__qualname__} is not plain data "
        "(str, numbers, bytes, lists, tuples, dicts with str keys, dates, email messages)"
    )


def _to_base64(data: bytes | bytearray | memoryview) -> str:
    # binascii takes any buffer as it is: no extra copy of a large attachment.
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _encode_dict(value: dict[Any, Any], where: str, depth: int) -> dict[str, Any]:
    for key in value:
        if not isinstance(key, str):
            raise UnstorableEmail(f"{where} cannot be stored: its key {key!r} is not a str")
    plain = all(type(key) is str and type(item) is str and not key.startswith("$") for key, item in value.items())
    if plain and depth < MAX_DEPTH:
        return value  # headers: nothing to tag
    encoded = {str(key): _encode_value(item, f"{where}[{key!r}]", depth + 1) for key, item in value.items()}
    if any(key.startswith("$") for key in encoded):
        return {"$dict": encoded}  # keep a user's "$..." key apart from our tags
    return encoded


# Decoding ---------------------------------------------------------------


def _decode_email(encoded: dict[str, Any], depth: int = 0) -> EmailMessage:
    cls = _email_class(encoded["class"])
    try:
        message = cls()
    except Exception:
        message = cls.__new__(cls)
        detach_connection(message)
    for name in EMAIL_FIELDS:
        if name in encoded:
            if django.VERSION >= (6, 0) and REMOVED_SUBTYPES.get(name, _MISSING) == encoded[name]:
                continue  # stored on Django 5.2, where every email had it
            setattr(message, name, _decode_value(encoded[name], depth + 1))
    message.attachments = [_decode_attachment(item, depth + 1) for item in encoded.get("attachments", [])]
    if "alternatives" in encoded:
        if not isinstance(message, EmailMultiAlternatives):
            raise UndecodableData(f"a {encoded['class']} has no alternatives")
        message.alternatives = [
            EmailAlternative(_decode_value(item["content"], depth + 1), _decode_value(item["mimetype"], depth + 1))
            for item in encoded["alternatives"]
        ]
    for name, value in encoded.get("extra", {}).items():
        if name in EMAIL_FIELDS or name in NOT_STORED or legacy.is_behaviour(cls, name):
            raise UndecodableData(f"message data sets {name!r}, which is not an attribute a {cls.__name__} may add")
        setattr(message, name, _decode_value(value, depth + 1))
    return message


def _email_class(path: str) -> type[EmailMessage]:
    """Return the class a stored message names, if it is one that may be queued.

    A row is data: it must not be able to make the worker import a module of
    its choosing (imports run code), so only the listed classes are imported.
    """
    if path not in email_classes():
        raise UndecodableData(f"message class {path} is not one that may be queued (MAILER_EMAIL_CLASSES)")
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise UndecodableData(f"message class {path} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, EmailMessage)):
        raise UndecodableData(f"{path} is not an EmailMessage class")
    return cls


def email_classes() -> set[str]:
    """Return the dotted paths of the ``EmailMessage`` classes that may be queued."""
    return DEFAULT_EMAIL_CLASSES | set(conf.get_setting("MAILER_EMAIL_CLASSES"))


def _decode_attachment(item: dict[str, Any], depth: int) -> Any:
    if "mime" in item:
        return _decode_mime(item["mime"])
    return EmailAttachment(
        _decode_value(item["filename"], depth),
        _decode_value(item["content"], depth),
        _decode_value(item["mimetype"], depth),
    )


# The parser to read each kind of stored MIME object with: the class it
# builds and the policy it was made under.
_MIME_PARSERS: dict[str, tuple[Any, Any]] = {
    "part": (email.message.MIMEPart, email.policy.default),
    "mimebase": (StoredMIMEBase, email.policy.compat32),
    "message": (email.message.Message, email.policy.compat32),
}


def _decode_mime(encoded: dict[str, Any]) -> email.message.Message:
    message_class, policy = _MIME_PARSERS[encoded["kind"]]
    parser = email.parser.BytesParser(message_class, policy=policy)
    source = binascii.a2b_base64(encoded["bytes"])
    check_source_bounds(source)
    message: email.message.Message = parser.parsebytes(source)
    return message


def _decode_tuple(value: Any, depth: int) -> tuple[Any, ...]:
    return tuple(_decode_value(item, depth) for item in value)


def _decode_dict(value: Any, depth: int) -> dict[str, Any]:
    return {key: _decode_value(item, depth) for key, item in value.items()}


# How each tag of ``_encode_value`` reads back; each takes the tagged value
# and how deep it stands.
_TAGS: dict[str, Callable[[Any, int], Any]] = {
    "$bytes": lambda value, depth: binascii.a2b_base64(value),
    "$tuple": _decode_tuple,
    "$float": lambda value, depth: float(value),
    "$datetime": lambda value, depth: datetime.datetime.fromisoformat(value),
    "$date": lambda value, depth: datetime.date.fromisoformat(value),
    "$time": lambda value, depth: datetime.time.fromisoformat(value),
    "$timedelta": lambda value, depth: datetime.timedelta(*value),
    "$decimal": lambda value, depth: decimal.Decimal(value),
    "$email": lambda value, depth: _decode_email(value, depth),
    "$mime": lambda value, depth: _decode_mime(value),
    "$dict": _decode_dict,
}


def _decode_value(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise UndecodableData(f"message data is nested more than {MAX_DEPTH} deep")
    if isinstance(value, list):
        return [_decode_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, item),) = value.items()
            if key in _TAGS:
                return _TAGS[key](item, depth + 1)
        return _decode_dict(value, depth + 1)
    return value
