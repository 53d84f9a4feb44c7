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
import datetime
import decimal
import email.message
import email.parser
import email.policy
import json
from collections.abc import Callable
from email.mime.base import MIMEBase
from typing import Any

from django.core.mail import EmailAlternative, EmailAttachment, EmailMessage, EmailMultiAlternatives
from django.utils.functional import Promise
from django.utils.module_loading import import_string

from mailer import conf, legacy
from mailer.compat import detach_connection
from mailer.exceptions import UndecodableData, UnstorableEmail
from mailer.message_id import get_message_id
from mailer.mime import StoredMIMEBase

__all__ = [
    "FORMAT_VERSION",
    "SEARCH_COLUMNS",
    "StoredMIMEBase",
    "UndecodableData",
    "UnstorableEmail",
    "db_to_email",
    "decode",
    "email_classes",
    "email_to_db",
    "is_legacy",
    "search_columns",
]

FORMAT_VERSION = 1

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

# The classes a stored message may name, besides MAILER_EMAIL_CLASSES.
DEFAULT_EMAIL_CLASSES = {
    "django.core.mail.message.EmailMessage",
    "django.core.mail.message.EmailMultiAlternatives",
    "anymail.message.AnymailMessage",
}


def email_to_db(value: Any) -> str:
    """Encode ``value`` (an ``EmailMessage``, or any plain value) as text for ``message_data``."""
    if isinstance(value, EmailMessage):
        document = {"mailer": FORMAT_VERSION, "email": _encode_email(value, "email")}
    else:
        document = {"mailer": FORMAT_VERSION, "value": _encode_value(value, "value")}
    # ASCII only, as django-mailer's base64 was: MySQL tables in the old
    # three-byte "utf8" charset cannot hold every character.
    return json.dumps(document, separators=(",", ":"))


def db_to_email(data: str | bytes | None) -> Any:
    """Decode ``message_data``; return None when it is empty, unreadable or refused."""
    try:
        return decode(data)
    except UndecodableData:
        return None


def decode(data: str | bytes | None) -> Any:
    """Decode ``message_data``; return None when it is empty, raise UndecodableData when it cannot be decoded."""
    if not data:
        return None
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogateescape")
    if not is_legacy(data):
        return _decode_document(data)
    return legacy.loads(data)


SEARCH_COLUMNS = ("subject", "from_email", "recipients", "message_id")


def search_columns(value: Any) -> dict[str, str | None]:
    """Return what the searchable columns hold for an email: subject, sender, recipients, Message-ID."""
    if not isinstance(value, EmailMessage):
        return {"subject": "", "from_email": "", "recipients": "", "message_id": None}
    message_id = get_message_id(value)
    return {
        "subject": str(value.subject or ""),
        "from_email": str(value.from_email or ""),
        "recipients": ", ".join(map(str, value.recipients())),
        "message_id": str(message_id) if message_id is not None else None,
    }


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


def _encode_email(message: EmailMessage, where: str) -> dict[str, Any]:
    cls = type(message)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if path not in email_classes():
        raise UnstorableEmail(f"{where} is a {path}: add it to MAILER_EMAIL_CLASSES to queue it")
    encoded: dict[str, Any] = {"class": path}
    for name in EMAIL_FIELDS:
        if hasattr(message, name):
            encoded[name] = _encode_value(getattr(message, name), f"{where}.{name}")
    encoded["attachments"] = [
        _encode_attachment(item, f"{where}.attachments[{index}]") for index, item in enumerate(message.attachments)
    ]
    if isinstance(message, EmailMultiAlternatives):
        encoded["alternatives"] = [
            {
                "content": _encode_value(content, f"{where}.alternatives[{index}]"),
                "mimetype": _encode_value(mimetype, f"{where}.alternatives[{index}]"),
            }
            for index, (content, mimetype) in enumerate(message.alternatives)
        ]
    extras = _extra_attributes(message)
    if extras:
        encoded["extra"] = {name: _encode_value(value, f"{where}.{name}") for name, value in extras.items()}
    return encoded


def _extra_attributes(message: EmailMessage) -> dict[str, Any]:
    """Return the instance attributes a subclass added, less those still at their constructor default.

    Defaults need not be stored (decoding calls the constructor again), and
    some are not plain data: django-anymail's ``UNSET`` markers and its empty
    ``AnymailStatus``.
    """
    known = set(EMAIL_FIELDS) | NOT_STORED
    if isinstance(message, EmailMultiAlternatives):
        known.add("alternatives")
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


def _encode_attachment(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, email.message.Message):
        return {"mime": _encode_mime(item)}
    try:
        filename, content, mimetype = item
    except (TypeError, ValueError) as exc:
        raise UnstorableEmail(f"{where} is neither a (filename, content, mimetype) triple nor a MIME part") from exc
    return {
        "filename": _encode_value(filename, where),
        "content": _encode_value(content, where),
        "mimetype": _encode_value(mimetype, where),
    }


def _encode_mime(part: email.message.Message) -> dict[str, Any]:
    """Store a MIME object as the bytes it renders to, with the family it belongs to."""
    if isinstance(part, email.message.MIMEPart):
        kind = "part"
    elif isinstance(part, MIMEBase):
        kind = "mimebase"
    else:
        kind = "message"
    data = part.as_bytes()
    return {"kind": kind, "bytes": _to_base64(data)}


def _encode_value(value: Any, where: str) -> Any:
    """Return ``value`` as JSON-ready data, tagging what JSON cannot hold."""
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
        return [_encode_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_value(item, f"{where}[{index}]") for index, item in enumerate(value)]}
    if isinstance(value, dict):
        return _encode_dict(value, where)
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
        return {"$email": _encode_email(value, where)}
    if isinstance(value, email.message.Message):
        return {"$mime": _encode_mime(value)}
    raise UnstorableEmail(
        f"{where} cannot be stored: a {type(value).__module__}.{type(value).__qualname__} is not plain data "
        "(str, numbers, bytes, lists, tuples, dicts with str keys, dates, email messages)"
    )


def _to_base64(data: bytes | bytearray | memoryview) -> str:
    # binascii takes any buffer as it is: no extra copy of a large attachment.
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _encode_dict(value: dict[Any, Any], where: str) -> dict[str, Any]:
    for key in value:
        if not isinstance(key, str):
            raise UnstorableEmail(f"{where} cannot be stored: its key {key!r} is not a str")
    encoded = {str(key): _encode_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    if any(key.startswith("$") for key in encoded):
        return {"$dict": encoded}  # keep a user's "$..." key apart from our tags
    return encoded


# Decoding ---------------------------------------------------------------


def _decode_email(encoded: dict[str, Any]) -> EmailMessage:
    cls = _email_class(encoded["class"])
    try:
        message = cls()
    except Exception:
        message = cls.__new__(cls)
        detach_connection(message)
    for name in EMAIL_FIELDS:
        if name in encoded:
            setattr(message, name, _decode_value(encoded[name]))
    message.attachments = [_decode_attachment(item) for item in encoded.get("attachments", [])]
    if "alternatives" in encoded:
        if not isinstance(message, EmailMultiAlternatives):
            raise UndecodableData(f"a {encoded['class']} has no alternatives")
        message.alternatives = [
            EmailAlternative(_decode_value(item["content"]), _decode_value(item["mimetype"]))
            for item in encoded["alternatives"]
        ]
    for name, value in encoded.get("extra", {}).items():
        setattr(message, name, _decode_value(value))
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


def _decode_attachment(item: dict[str, Any]) -> Any:
    if "mime" in item:
        return _decode_mime(item["mime"])
    return EmailAttachment(
        _decode_value(item["filename"]), _decode_value(item["content"]), _decode_value(item["mimetype"])
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
    message: email.message.Message = parser.parsebytes(binascii.a2b_base64(encoded["bytes"]))
    return message


_TAGS: dict[str, Callable[[Any], Any]] = {
    "$bytes": binascii.a2b_base64,
    "$tuple": lambda value: tuple(_decode_value(item) for item in value),
    "$float": float,
    "$datetime": datetime.datetime.fromisoformat,
    "$date": datetime.date.fromisoformat,
    "$time": datetime.time.fromisoformat,
    "$timedelta": lambda value: datetime.timedelta(*value),
    "$decimal": decimal.Decimal,
    "$email": lambda value: _decode_email(value),
    "$mime": lambda value: _decode_mime(value),
    "$dict": lambda value: {key: _decode_value(item) for key, item in value.items()},
}


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, item),) = value.items()
            if key in _TAGS:
                return _TAGS[key](item)
        return {key: _decode_value(item) for key, item in value.items()}
    return value
