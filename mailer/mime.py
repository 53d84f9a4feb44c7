"""MIME objects that mailer reads back from storage."""

import email.message
import email.parser
import email.policy
import re
from email.mime.base import MIMEBase
from typing import Any


class StoredMIMEBase(MIMEBase):
    """A legacy ``email.mime`` attachment read back from storage.

    Django treats ``MIMEBase`` instances as ready-made parts; the parser
    needs a class it can create without arguments, which ``MIMEBase`` is not.
    """

    def __init__(self, policy: Any = email.policy.compat32) -> None:
        email.message.Message.__init__(self, policy=policy)


# Python's email package folds and parses some headers in quadratic time, and
# walks nested parts line by line at every level: a stored MIME object must
# stay within these before it is rendered.
MAX_PARTS = 200
MAX_HEADER_LENGTH = 4096
MAX_HEADERS_LENGTH = 32768

# The headers the email package parses as addresses, and those it parses otherwise.
ADDRESS_HEADERS = frozenset(
    {
        "bcc", "cc", "from", "reply-to", "resent-bcc", "resent-cc", "resent-from", "resent-sender", "resent-to",
        "sender", "to",
    }
)  # fmt: skip
PARSED_HEADERS = frozenset({"content-disposition", "content-type", "message-id"})

# The package parses the comments of these (RFC 5322: "a@example.com (a (nested) comment)") by recursion, a
# few frames of Python's stack for each level: nested some hundred deep, they exhaust it, when the message
# is rendered or not, as deep as the stack already is. Mail nests them a level or two, if at all.
MAX_COMMENT_DEPTH = 32
COMMENTED_HEADERS = ADDRESS_HEADERS | PARSED_HEADERS | {"content-transfer-encoding", "mime-version"}


def comment_depth(text: str) -> int:
    """How deep the comments of the header value ``text`` could nest as the email package reads them (0: it has
    none). Never less than it reads: every "(" counts as opening one, within quotes or after a backslash too, as
    the package may not take them as such (a backslash outside a comment escapes nothing to it).
    """
    if "(" not in text:
        return 0
    depth = deepest = 0
    escaped = False
    for char in text:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth and not escaped:
            depth -= 1
        escaped = char == "\\" and not escaped
    return deepest


def _check_comments(name: Any, value: Any) -> None:
    if str(name).lower() in COMMENTED_HEADERS and comment_depth(str(value)) > MAX_COMMENT_DEPTH:
        raise ValueError(f"a MIME header ({name!s:.40}) with comments nested deeper than {MAX_COMMENT_DEPTH}")


def check_bounds(part: email.message.Message) -> None:
    """Raise ValueError if ``part`` has more parts, or longer headers, than a stored attachment may have."""
    total = 0
    multiparts = 0
    for count, each in enumerate(part.walk(), start=1):
        if count > MAX_PARTS:
            raise ValueError(f"a MIME attachment of more than {MAX_PARTS} parts")
        multiparts += each.is_multipart()
        if multiparts > MAX_MULTIPARTS:
            raise ValueError(f"a MIME attachment of more than {MAX_MULTIPARTS} multipart parts")
        for name, value in each.raw_items():
            length = len(str(value))
            total += length
            if length > MAX_HEADER_LENGTH:
                raise ValueError(f"a MIME header ({name!s:.40}) longer than {MAX_HEADER_LENGTH} characters")
            _check_comments(name, value)
            if total > MAX_HEADERS_LENGTH:
                raise ValueError(f"MIME headers longer than {MAX_HEADERS_LENGTH} characters in all")


# A part nested in others is read once for each multipart above it: a stored
# MIME object may have this many multipart containers.
MAX_MULTIPARTS = 20


def check_message_source(content: str | bytes) -> None:
    """Raise ValueError if ``content``, the text of an attachment of a ``message/`` type, declares more multipart
    containers than a stored MIME object may have, or nests comments deeper in a header the email package parses:
    Django parses it as a message when it renders the email.
    """
    source = content if isinstance(content, bytes) else content.encode("utf-8", "replace")
    check_source_bounds(source)
    # Parsed as it is stored (compat32 reads header values without parsing them), within the bound above.
    for part in email.parser.BytesParser(policy=email.policy.compat32).parsebytes(source).walk():
        for name, value in part.raw_items():
            _check_comments(name, value)


def is_message_type(mimetype: object) -> bool:
    """Whether an attachment or alternative of MIME type ``mimetype`` is one that Django parses as a message."""
    return isinstance(mimetype, str) and mimetype.lower().startswith("message/")


def check_source_bounds(source: bytes) -> None:
    """Raise ValueError if the MIME ``source`` declares more multipart containers than it may have.

    Checked before parsing: the parser reads every line once for each
    multipart that encloses it.
    """
    if len(_MULTIPART_DECLARATION.findall(source)) > MAX_MULTIPARTS:
        raise ValueError(f"a MIME attachment of more than {MAX_MULTIPARTS} multipart parts")


_MULTIPART_DECLARATION = re.compile(rb"^content-type:[ \t]*multipart/", re.IGNORECASE | re.MULTILINE)
