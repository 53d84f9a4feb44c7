"""What mailer may write about a message when ``MAILER_EMAIL_LOG_MESSAGE_DATA`` is off.

With the setting off, the log keeps no content, and the addresses and the
subject of a message are blanked out of every text mailer writes or raises
(mail servers name addresses in their errors): its log rows, its log lines,
and the exceptions it raises again. Everything that writes such a text asks
``loggable``; this module is the whole policy.
"""

import collections
import contextlib
import functools
import re
from email.header import Header
from email.utils import getaddresses, parseaddr
from typing import Any, Protocol

from mailer import conf

REDACTED = "<redacted>"

# Headers of ``extra_headers`` that hold addresses.
ADDRESS_HEADERS = {"from", "sender", "reply-to", "to", "cc", "bcc", "return-path"}

# A display name shorter than this identifies nobody, and would blank out
# ordinary words.
SHORTEST_NAME = 3


class Searchable(Protocol):
    """What redaction needs of a queued message: its searchable columns and its email."""

    @property
    def subject_copy(self) -> str | None: ...

    @property
    def from_email(self) -> str | None: ...

    @property
    def recipients(self) -> str | None: ...

    @property
    def email(self) -> Any: ...


def keeps_message_data() -> bool:
    """Return whether the site lets mailer keep and log message content."""
    return bool(conf.get_setting("MAILER_EMAIL_LOG_MESSAGE_DATA"))


def address_of(recipient: str) -> str:
    """Return the bare, lower-cased address in ``recipient`` ("Name <a@b>" or "a@b")."""
    return (parseaddr(recipient)[1] or recipient).lower()


# A run of the characters an address may hold, up to what ends one in a text.
ADDRESS_RUN = re.compile(r"[^\s<>(),;:\"']+")


def addresses_like(text: str) -> list[str]:
    """Return everything in ``text`` shaped like an address: characters, "@", characters, up to what ends a run.

    Such a thing is a whole run of ``ADDRESS_RUN``, one with an "@" that has
    a character on each side. Looking for runs keeps this linear: a pattern
    with the "@" in the middle would try every start in a long run without
    one (a display name, say), and read the rest of the run from each.
    """
    return [run for run in ADDRESS_RUN.findall(text) if "@" in run[1:-1]]


def secrets_of(message: Searchable) -> set[str]:
    """Return every form in which the addresses, names and subject of ``message`` may appear in a text.

    They are read from the stored email as well as from the search columns,
    which are empty for a row no version of mailer has saved yet. Each text
    is read on its own, so one that does not parse costs nothing else.
    """
    subjects = [message.subject_copy]
    address_texts = [message.from_email, message.recipients]
    try:
        email = message.email
    except Exception:  # an unreadable row: its columns are all there is
        email = None
    if email is not None and hasattr(email, "extra_headers"):
        subjects.append(getattr(email, "subject", None))
        address_texts.append(getattr(email, "from_email", None))
        for field in ("to", "cc", "bcc", "reply_to"):
            address_texts.extend(getattr(email, field, None) or [])
        headers = email.extra_headers if isinstance(email.extra_headers, dict) else {}
        subjects.extend(value for name, value in headers.items() if str(name).lower() == "subject")
        address_texts.extend(value for name, value in headers.items() if str(name).lower() in ADDRESS_HEADERS)
    secrets: set[str] = set()
    for subject in filter(None, subjects):
        secrets.update(_subject_forms(str(subject)))
    for text in filter(None, address_texts):
        secrets.update(_address_forms(str(text)))
    return secrets


def _subject_forms(subject: str) -> set[str]:
    """The subject as written, and the encoded words and folded lines it becomes in a message's header."""
    forms = {subject, *(line.strip() for line in subject.splitlines())}
    with contextlib.suppress(Exception):  # no charset can write it: it cannot be sent either
        encoded = Header(subject, "utf-8").encode()
        forms.update(word for word in encoded.split() if len(word) >= 8)
    return {form for form in forms if form}


# Each name is read from the columns and from the email, for each text
# written about its message: encoding a long one takes a while.
@functools.lru_cache(maxsize=32)
def _encoded_words(name: str) -> frozenset[str]:
    """The RFC 2047 encoded words a non-ASCII display name becomes in a header.

    Django 5.2 hands smtplib each recipient with its display name so
    encoded, and smtplib names refused recipients as it was given them.
    """
    if name.isascii():
        return frozenset()
    try:
        encoded = Header(name, "utf-8").encode()
    except Exception:  # no charset can write it: it cannot be sent either
        return frozenset()
    return frozenset(word for word in encoded.split() if word.startswith("=?"))


def _address_forms(text: str) -> set[str]:
    """Each address in ``text``: as written, its display name, and the forms a mail server reports.

    What does not parse as addresses is taken as it is, with anything in it
    shaped like an address.
    """
    forms = set(addresses_like(text))
    pairs = getaddresses([text])
    if pairs == [("", "")]:
        forms.add(text)  # Python refuses to guess at it: take it all
        pairs = []
    for name, address in pairs:
        if len(name) >= SHORTEST_NAME:
            forms.update({name, *_encoded_words(name)})
        if address:
            forms.add(address)
    for address in list(forms):
        local, _, domain = address.rpartition("@")
        if local and domain:
            with contextlib.suppress(UnicodeError):  # not a domain IDNA can write
                # What a mail server reports for an international domain; and
                # the encoded word Django 5.2 makes of a non-ASCII local part.
                ascii_domain = domain.encode("idna").decode("ascii")
                forms.add(f"{local}@{ascii_domain}")
                if not local.isascii():
                    forms.add(f"{Header(local, 'utf-8').encode()}@{ascii_domain}")
    return forms


def redact(text: str, message: Searchable) -> str:
    """Blank every address, display name and subject of ``message`` out of ``text``, in any letter case.

    From the left, the longest secret that starts first is blanked out, and
    so on in the rest of the text after it: what a regular expression of the
    secrets, longest first, would replace. The time this takes grows with the
    length of the text and of the secrets, not with their product: a message
    to thousands of recipients may be refused in one text that names them all.
    """
    if not text:
        return text
    # A secret longer than the text cannot be in it (a long display name in a short reply, say).
    secrets = {fold_case(secret) for secret in secrets_of(message) if len(secret) <= len(text)}
    if not secrets:
        return text
    pieces = []
    kept_from = 0
    for start, end in SecretFinder(secrets).spans(fold_case(text)):
        pieces += [text[kept_from:start], REDACTED]
        kept_from = end
    pieces.append(text[kept_from:])
    return "".join(pieces)


def loggable(text: str, message: Searchable) -> str:
    """Return ``text`` fit to be logged: redacted unless message data may be logged."""
    if keeps_message_data():
        return text
    return redact(text, message)


def fold_case(text: str) -> str:
    """Return ``text`` with each character as ``re.IGNORECASE`` compares it: equal when they match in any letter case.

    Unlike ``str.lower`` and ``str.casefold``, it maps each character to
    exactly one: what is found in the folded text is at the same place in
    the text.
    """
    return text.translate(LETTER_CASE)


class _LetterCase(dict[int, int]):
    """The table ``fold_case`` translates with, filled as characters are met."""

    def __missing__(self, code: int) -> int:
        folded = ord(_fold_letter(chr(code)))
        # Characters past the BMP are rare, and kept, they would let texts
        # grow the table to a million entries.
        if code < 0x10000:
            self[code] = folded
        return folded


LETTER_CASE = _LetterCase()

# Letters ``re.IGNORECASE`` takes for one another because they have the same
# uppercase, of several characters (that no mapping of one character gives).
SAME_UPPERCASE = {"\u1fd3": "\u0390", "\u1fe3": "\u03b0", "\ufb05": "\ufb06"}


def _fold_letter(char: str) -> str:
    """Return the one character that stands for ``char`` and for every character ``re.IGNORECASE`` takes for it.

    It is the lowercase of the uppercase of its lowercase, so that letters
    sharing an uppercase are one: "ı", "ſ" and the Kelvin sign are "i", "s"
    and "k".
    """
    lower = _single(char.lower(), char)
    folded = _single(_single(lower.upper(), lower).lower(), lower)
    return SAME_UPPERCASE.get(folded, folded)


def _single(mapped: str, char: str) -> str:
    """Return ``mapped``, Python's full case mapping of ``char``, as ``re`` maps it: to one character.

    Where the full mapping has several, ``re`` keeps the character; but "İ",
    whose full lowercase is "i" and a combining dot, is "i" to it.
    """
    if len(mapped) == 1:
        return mapped
    return mapped[0] if char == "\u0130" else char


class SecretFinder:
    """Finds a set of strings in texts, in time that grows with the length of the text and of the strings.

    It is an Aho-Corasick automaton of the strings written backwards, so
    that reading a text backwards it knows, at each character, the longest
    string that starts there. The trie has a node for each prefix of a
    reversed string (``children`` leads from a node to the next); the
    ``fallback`` of a node is the node of the longest proper suffix of its
    prefix that is in the trie; ``longest`` is the length of the longest
    string that ends the prefix of a node (0 when none does).
    """

    def __init__(self, strings: set[str]) -> None:
        self.children: list[dict[str, int]] = [{}]
        self.longest = [0]
        for string in strings:
            self._add(string)
        self.fallback = [0] * len(self.children)
        self._link()

    def _add(self, string: str) -> None:
        node = 0
        for char in reversed(string):
            child = self.children[node].get(char)
            if child is None:
                child = self.children[node][char] = len(self.children)
                self.children.append({})
                self.longest.append(0)
            node = child
        self.longest[node] = len(string)

    def _link(self) -> None:
        """Set the ``fallback`` and ``longest`` of each node, by depth: a fallback is shallower than its node."""
        children, fallback, longest = self.children, self.fallback, self.longest
        parents = collections.deque([0])
        while parents:
            parent = parents.popleft()
            for char, child in children[parent].items():
                if parent:
                    node = fallback[parent]
                    while node and char not in children[node]:
                        node = fallback[node]
                    fallback[child] = children[node].get(char, 0)
                longest[child] = longest[child] or longest[fallback[child]]
                parents.append(child)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Return the (start, end) of each string to blank out of ``text``.

        From the left, the longest string that starts first is taken, and the
        search goes on after it, so that they do not overlap.
        """
        spans: list[tuple[int, int]] = []
        for start, length in reversed(self._longest_starting(text)):
            if not spans or start >= spans[-1][1]:
                spans.append((start, start + length))
        return spans

    def _longest_starting(self, text: str) -> list[tuple[int, int]]:
        """Return (place, length of the longest string starting there) for each place one starts, the last first."""
        children, fallback, longest = self.children, self.fallback, self.longest
        found = []
        node = 0
        for place in range(len(text) - 1, -1, -1):
            char = text[place]
            while node and char not in children[node]:
                node = fallback[node]
            node = children[node].get(char, 0)
            if longest[node]:
                found.append((place, longest[node]))
        return found
