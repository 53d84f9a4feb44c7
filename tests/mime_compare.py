"""What "the same message" means for stored email, as helpers tests can assert with.

The storage requirement ("no pickle in the database") defines exactness by
what Django would send: for every message, ``message()`` of the decoded
message and of the original have the same headers and the same tree of parts
with the same decoded payloads, leaving aside what is new on every call (the
``Date`` header and the MIME boundary strings).

Two views are provided:

- :func:`message_snapshot` / :func:`assert_same_message` implement that
  criterion. They look only at ``message()`` (plus ``recipients()``, because
  Bcc never reaches a header, and the class of the object), so any codec
  that sends the same bytes passes, whatever it stores.
- :func:`email_fields` / :func:`assert_same_fields` look at the Django
  object itself: every documented field, the named-tuple types of
  alternatives and attachments, and which family each attachment belongs to
  (triple, ``MIMEPart``, legacy ``MIMEBase``). Backends such as
  django-anymail read ``attachments`` directly instead of calling
  ``message()``, so a codec that renders the same MIME but turns a
  ``MIMEBase`` into something else could still break them.

Both produce flat lists of text lines, so a mismatch is shown as a unified
diff that points at the part and header that changed, instead of a wall of
nested reprs.
"""

import difflib
import email.message
import re
from email.header import Header
from email.mime.base import MIMEBase

from django.core.mail import EmailMessage
from django.utils.functional import Promise

# Headers Django's message() invents on every call when extra_headers does
# not supply them: a fresh Date and a fresh Message-ID.
GENERATED_HEADERS = ("date", "message-id")

# The boundary parameter of a multipart Content-Type is random (or absent
# until the message is serialized); the criterion leaves it aside.
_BOUNDARY_PARAM = re.compile(r';\s*boundary\s*=\s*(?:"[^"]*"|[^;\s]*)', re.IGNORECASE)

# Folding: a line break followed by whitespace inside a header value is
# only line-wrapping (RFC 5322, 2.2.3), not content. A header read back by
# the parser keeps the breaks it was folded with, one built in memory has
# none; it is the same header, so values are unfolded before comparing.
# (The bytes sent may then wrap differently, e.g. a long RFC 2231 filename
# as one parameter or as filename*0*/filename*1*: same decoded value.)
_FOLD = re.compile(r"\r?\n(?=[ \t])")

# Transfer encodings after which get_payload() is no longer the content
# itself. For the others (7bit, 8bit, binary, none) the raw payload string is
# compared as well, because get_payload(decode=True) of a compat32 part turns
# non-Latin-1 text into backslash escapes ("raw-unicode-escape"), which a
# literal "\u1234" in the text would also produce.
_TRANSFER_ENCODINGS = {"base64", "quoted-printable"}


def generated_headers(message: EmailMessage) -> set[str]:
    """Return the lower-cased headers message() will invent afresh for ``message``.

    A Date or Message-ID that the sender put in ``extra_headers`` is fixed
    and must survive storage, so it is compared; only the ones Django makes
    up on each call are left aside.
    """
    given = {str(name).lower() for name in (message.extra_headers or {})}
    return {name for name in GENERATED_HEADERS if name not in given}


def _nested_django_messages(message: EmailMessage):
    """Yield the Django messages attached (as message/rfc822 content) anywhere below ``message``.

    Their message() is called from inside the outer one, so their Date and
    Message-ID are just as fresh on every call.
    """
    for attachment in message.attachments:
        if isinstance(attachment, email.message.Message):
            continue
        content = attachment[1]
        if isinstance(content, EmailMessage):
            yield content
            yield from _nested_django_messages(content)


def message_snapshot(message: EmailMessage) -> list[str]:
    """Describe what ``message`` would send, as comparable lines (see the module docstring).

    Call it on the original before encoding (or inside the same translation
    override as the queueing code) so that what is compared is what was
    queued.
    """
    top = generated_headers(message)
    nested: set[str] = set()
    for inner in _nested_django_messages(message):
        nested |= generated_headers(inner)
    cls = type(message)
    lines = [
        f"class: {cls.__module__}.{cls.__qualname__}",
        f"recipients: {message.recipients()!r}",
    ]
    _describe_part(message.message(), "message", top, nested, lines)
    return lines


def mime_snapshot(part: email.message.Message) -> list[str]:
    """Describe a stand-alone MIME object (an attachment) as comparable lines; nothing in it is generated."""
    lines: list[str] = []
    _describe_part(part, "part", set(), set(), lines)
    return lines


def _header_text(name: str, value) -> str:
    """Return a header value as text, exactly enough to tell two values apart.

    Legacy ``Header`` objects are shown encoded, since their ``str()`` drops
    the charset. Folding is undone and the boundary parameter is cut out of
    Content-Type.
    """
    text = _FOLD.sub("", value.encode() if isinstance(value, Header) else str(value))
    if name.lower() == "content-type":
        text = _BOUNDARY_PARAM.sub("", text)
    return text


def _describe_part(part, path: str, volatile: set[str], nested_volatile: set[str], lines: list[str]) -> None:
    """Append the lines describing ``part`` and, recursively, its sub-parts.

    ``volatile`` names the headers of this part that Django generates afresh
    (only ever Date and Message-ID, only at message level); their position is
    still recorded, their value is not. ``nested_volatile`` is used for the
    messages inside message/* parts.
    """
    for name, value in part.items():
        if name.lower() in volatile:
            lines.append(f"{path} header {name}: <generated on every call, not compared>")
        else:
            lines.append(f"{path} header {name}: {_header_text(name, value)}")
    params = [(key, value) for key, value in (part.get_params() or [])[1:] if key.lower() != "boundary"]
    lines.append(f"{path} content-type: {part.get_content_type()} params={params!r}")
    lines.append(
        f"{path} disposition: {part.get_content_disposition()!r}"
        f" params={(part.get_params(header='content-disposition') or [])[1:]!r}"
        f" filename={part.get_filename()!r} content-id={part.get('Content-ID')!r}"
    )
    # None and "" serialize alike (nothing is written); the parser gives a
    # multipart an epilogue of "" where one built in memory has None.
    if part.preamble or part.epilogue:
        lines.append(f"{path} preamble={part.preamble!r} epilogue={part.epilogue!r}")
    if part.is_multipart():
        # multipart/* holds parts; message/rfc822 holds one whole message,
        # whose own Date and Message-ID may be generated.
        child_volatile = nested_volatile if part.get_content_maintype() == "message" else set()
        children = part.get_payload()
        lines.append(f"{path} sub-parts: {len(children)}")
        for index, child in enumerate(children):
            _describe_part(child, f"{path}.{index}", child_volatile, nested_volatile, lines)
        return
    lines.append(f"{path} decoded payload: {part.get_payload(decode=True)!r}")
    transfer = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if transfer not in _TRANSFER_ENCODINGS:
        lines.append(f"{path} raw payload: {part.get_payload()!r}")


def _fail_with_diff(expected: list[str], actual: list[str], what: str) -> None:
    diff = "\n".join(difflib.unified_diff(expected, actual, "original", "decoded", lineterm="", n=2))
    raise AssertionError(f"{what} differs after the storage round trip:\n{diff}")


def assert_same_snapshot(expected: list[str], decoded: EmailMessage) -> None:
    """Assert that ``decoded`` sends what ``expected`` (a :func:`message_snapshot`) describes."""
    actual = message_snapshot(decoded)
    if actual != expected:
        _fail_with_diff(expected, actual, "message()")


def assert_same_message(original: EmailMessage, decoded: EmailMessage) -> None:
    """Assert the storage criterion: ``decoded.message()`` equals ``original.message()`` (see module docstring)."""
    assert_same_snapshot(message_snapshot(original), decoded)


# Field level ----------------------------------------------------------------

# The documented fields of EmailMessage / EmailMultiAlternatives.
# mixed_subtype and alternative_subtype exist only before Django 6.0, where
# setting mixed_subtype = "related" was the usual way to send inline images.
_FIELDS = (
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


def _value_lines(value, path: str, lines: list[str]) -> None:
    """Describe ``value`` with its type, so a list that came back a tuple, or bytes that came back str, shows.

    A lazy translation string is described as the ``str`` it resolves to:
    the requirement is that lazy strings are resolved when queued, so the
    original's lazy value and the decoded plain string count as equal here
    (a separate test checks the decoded type).
    """
    if isinstance(value, Promise):
        value = str(value)
    if isinstance(value, EmailMessage):
        lines.append(f"{path}: Django message")
        lines.extend(f"{path} | {line}" for line in email_fields(value))
    elif isinstance(value, email.message.Message):
        lines.append(f"{path}: {_mime_family(value)}")
        lines.extend(f"{path} | {line}" for line in mime_snapshot(value))
    elif isinstance(value, dict):
        lines.append(f"{path}: {type(value).__name__} of {len(value)}")
        for key, item in value.items():
            _value_lines(item, f"{path}[{key!r}]", lines)
    elif isinstance(value, (list, tuple)):
        lines.append(f"{path}: {type(value).__name__} of {len(value)}")
        for index, item in enumerate(value):
            _value_lines(item, f"{path}[{index}]", lines)
    else:
        lines.append(f"{path}: {type(value).__name__} {value!r}")


def _mime_family(part: email.message.Message) -> str:
    """Name the kind of MIME object Django distinguishes: modern MIMEPart, legacy MIMEBase, or other Message."""
    if isinstance(part, email.message.MIMEPart):
        return "MIMEPart"
    if isinstance(part, MIMEBase):
        return "MIMEBase"
    return "Message"


def email_fields(message: EmailMessage) -> list[str]:
    """Describe every field of a Django message, including attachments and alternatives, as comparable lines."""
    cls = type(message)
    lines = [f"class: {cls.__module__}.{cls.__qualname__}"]
    for name in _FIELDS:
        _value_lines(getattr(message, name, None), name, lines)
    if hasattr(message, "alternatives"):
        _value_lines(message.alternatives, "alternatives", lines)
    _value_lines(message.attachments, "attachments", lines)
    return lines


def assert_same_field_lines(expected: list[str], decoded: EmailMessage) -> None:
    """Assert that ``decoded`` has the fields ``expected`` (an :func:`email_fields`) describes."""
    actual = email_fields(decoded)
    if actual != expected:
        _fail_with_diff(expected, actual, "The Django message's fields")


def assert_same_fields(original: EmailMessage, decoded: EmailMessage) -> None:
    """Assert that every field of ``original`` survived into ``decoded`` (types of containers included)."""
    assert_same_field_lines(email_fields(original), decoded)
