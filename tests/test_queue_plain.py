"""Queueing skips what it can prove needless, and nothing it skips could have failed.

A plain address is not parsed and a plain email is not rendered when
queued (``mailer.addresses``): both cost more than storing the message.
These property tests draw addresses and emails from both sides of that line,
with the characters and types that make Django fail, and check that
whatever is taken as plain is taken by the full check and rendered by the
installed Django. The examples near the line are kept in the lists below.
"""

import django
import pytest
from django.core.mail import EmailAlternative, EmailMessage, EmailMultiAlternatives
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mailer
from mailer.addresses import bare_address, check_address, check_addresses, is_plain, is_plain_address
from mailer.backend import DbBackend
from mailer.exceptions import InvalidAddress, MailerError
from mailer.models import Message
from mailer.redaction import address_of

pytestmark = pytest.mark.django_db

# What makes Python's parser or Django's renderer stumble: specials, spaces,
# controls and line breaks, quotes, non-ASCII letters, a lone surrogate.
TRICKY = "ab.-_@<>\"'(),;:\\[] \t\r\n\x00\x0b\x7f\x85\u2028é✓\ud800"
atoms = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
labels = st.text(alphabet="abc019-", min_size=1, max_size=6)
tricky = st.text(alphabet=TRICKY, max_size=8)


@st.composite
def addresses(draw):
    """Addresses shaped like plain ones, spoilt now and then, with and without a display name."""
    local = ".".join(draw(st.lists(atoms, min_size=1, max_size=3)))
    domain = ".".join(draw(st.lists(labels, min_size=1, max_size=3)))
    address = f"{local}@{domain}"
    if draw(st.booleans()):
        position = draw(st.integers(0, len(address)))
        address = address[:position] + draw(tricky) + address[position:]
    shape = draw(st.sampled_from(["bare", "words", "quoted", "junk"]))
    if shape == "words":
        words = draw(st.lists(st.text(alphabet='Adaé✓ .,"\x00\u2028', min_size=1, max_size=6), min_size=1, max_size=3))
        return f"{' '.join(words)} <{address}>"
    if shape == "quoted":
        return f'"{draw(st.text(alphabet=TRICKY, min_size=1, max_size=8))}" <{address}>'
    if shape == "junk":
        return draw(tricky) + address
    return address


def slow_check(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check ``address`` as it was checked before plain addresses were let through: by parsing it."""
    with monkeypatch.context() as patch:
        patch.setattr("mailer.addresses.is_plain_address", lambda address: False)
        check_address(address, "to[0]")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(addresses())
@example("Ada Lovelace <ada@example.com>")
@example('"Lovelace, Ada" <ada@example.com>')
@example("Zoë Ünicode <zoe@example.com>")
@example("a@localhost")
def test_a_plain_address_is_one_the_parser_takes_and_finds_the_same_address_in(monkeypatch, address):
    """What is not parsed would have passed the parser, and the don't-send list sees the same bare address."""
    if not is_plain_address(address):
        return
    slow_check(address, monkeypatch)
    assert bare_address(address) == address_of(address)


@pytest.mark.parametrize(
    "address",
    [
        "J. Smith <j@example.com>",  # a period in a phrase: parsed (and refused) as before
        "a@example.com.",
        "a..b@example.com",
        "a@-example.com",
        "user@exämple.com",
        "jöhn@example.com",
        "Ada\u2028 <ada@example.com>",
        "Ada\x85 <ada@example.com>",
        '"" <ada@example.com>',
        "Ada  Lovelace <ada@example.com>",
        "<ada@example.com>",
        "webmaster",
    ],
)
def test_addresses_near_the_line_are_parsed(address):
    assert not is_plain_address(address)


@pytest.mark.parametrize("address", [":;a@example.com", ":;0@0", '"', "0@[", "0@[ "])
def test_an_address_pythons_parser_stumbles_on_is_refused_as_invalid(address):
    """Found by the property test above: an AttributeError, IndexError or UnboundLocalError escaped the check."""
    with pytest.raises(InvalidAddress, match=r"to\[0\] is not a valid address"):
        mailer.send_mail("Subject", "Body", "from@example.com", [address])


def mostly(usual, unusual):
    """Draw from ``usual`` three times in four: an email is then plain or one step away from it."""
    return st.sampled_from([usual, usual, usual, unusual]).flatmap(lambda strategy: strategy)


PLAIN_TYPES = ["application/pdf", "image/png", "text/plain", "text/csv", "application/vnd.ms-excel"]
UNUSUAL_TYPES = ["text/plain; charset=latin-1", "message/rfc822", "multipart/mixed", "TEXT/plain", "nonsense",
                 "application/", None]  # fmt: skip
PLAIN_HEADERS = ["X-Tag", "X-Ref", "List-Unsubscribe", "X-Mailer", "Message-ID", "message-id"]
UNUSUAL_HEADERS = ["Date", "To", "Bcc", "Message-ID", "Content-Type", "Subject", "From", "Reply-To"]
texts = mostly(
    st.text(alphabet="Hello wörld ✓<>&;:,.'\"=?", max_size=12), st.text(alphabet=TRICKY + "xyz", max_size=10)
)
message_ids = st.builds("<{}.{}@{}.{}>".format, atoms, atoms, atoms, labels)
values = mostly(texts, mostly(message_ids, st.builds("<{}@{}>".format, texts, texts)))  # header values
plain_addresses = st.builds("{}@{}.com".format, atoms, labels) | st.builds(
    "Ada {} <{}@example.com>".format, atoms, atoms
)
any_addresses = mostly(plain_addresses, addresses())
attachments = st.tuples(
    mostly(
        st.sampled_from([None, "report.pdf", "données ✓.csv"]), st.text(alphabet="report.pdf é\n\t\ud800", max_size=8)
    ),
    st.binary(max_size=8) | texts,
    mostly(st.sampled_from(PLAIN_TYPES), st.sampled_from(UNUSUAL_TYPES)),
)
alternative_parts = (
    mostly(texts, st.binary(max_size=4)),
    mostly(st.sampled_from(["text/html", "text/plain"]), st.sampled_from(["image/png", "html", "TEXT/html"])),
)
alternatives = mostly(st.builds(EmailAlternative, *alternative_parts), st.tuples(*alternative_parts))


@st.composite
def emails(draw):
    """Emails of every shape ``is_plain`` looks at, most of them plain or one step away from it."""
    cls = draw(st.sampled_from([EmailMessage, EmailMultiAlternatives]))
    email = cls(
        draw(texts),
        draw(mostly(st.text(max_size=50), texts)),
        draw(any_addresses),
        draw(st.lists(any_addresses, min_size=1, max_size=2)),
        cc=draw(st.lists(any_addresses, max_size=1)),
        reply_to=draw(st.lists(any_addresses, max_size=1)),
        headers=draw(st.dictionaries(mostly(st.sampled_from(PLAIN_HEADERS), st.sampled_from(UNUSUAL_HEADERS)), values)),
    )
    email.attachments = draw(st.lists(attachments, max_size=2))
    if cls is EmailMultiAlternatives:
        email.alternatives = draw(st.lists(alternatives, max_size=2))
    email.encoding = draw(mostly(st.sampled_from([None, "utf-8"]), st.sampled_from(["ascii", "iso-8859-1", "UTF-8"])))
    email.content_subtype = draw(mostly(st.sampled_from(["plain", "html"]), st.just("x-weird")))
    if draw(st.integers(0, 9)) == 0:
        email.mixed_subtype = "related"
    return email


@settings(max_examples=500, deadline=None)
@given(emails())
def test_a_plain_email_is_one_the_installed_django_renders(email):
    """``Message.for_email`` renders only what is not plain: a plain email must render, every time."""
    try:
        check_addresses(email)
    except MailerError:
        return
    if not is_plain(email):
        return
    email.message().as_bytes()


def test_a_subclass_another_charset_or_a_mime_part_is_rendered_when_queued(settings):
    """Django's error for each reaches the caller, as it did when every message was rendered."""
    settings.MAILER_EMAIL_CLASSES = ["tests.test_queue_plain.Refusing"]
    with pytest.raises(RuntimeError, match="refused by the subclass"):
        DbBackend().send_messages([Refusing("Subject", "Body", "f@example.com", ["t@example.com"])])

    email = EmailMessage("Subject", "Body ✓", "f@example.com", ["t@example.com"])
    email.encoding = "ascii"
    with pytest.raises(UnicodeEncodeError):
        DbBackend().send_messages([email])

    email = EmailMessage("Subject", "Body", "f@example.com", ["t@example.com"])
    email.attachments = [("b.bin", b"\xff", "nonsense")]
    with pytest.raises(ValueError):  # noqa: PT011  # Django's own, worded by each version
        DbBackend().send_messages([email])
    assert Message.objects.count() == 0


def test_an_alternative_given_as_a_bare_tuple_is_refused_when_queued_where_django_cannot_send_it():
    """Django 6.1 reads ``alternative.mimetype``: a tuple put in ``alternatives`` by hand fails there, 5.2 sends it."""
    email = EmailMultiAlternatives("Subject", "Body", "f@example.com", ["t@example.com"])
    email.alternatives = [("<p>Body</p>", "text/html")]
    try:
        email.message()
    except AttributeError:
        with pytest.raises(AttributeError):
            DbBackend().send_messages([email])
        assert Message.objects.count() == 0
    else:
        assert DbBackend().send_messages([email]) == 1


def test_a_sites_own_message_id_is_kept_and_two_are_left_to_django():
    """A plain Message-ID of the site's own needs no rendering; two of them (in two cases) are Django's to judge."""
    email = EmailMessage("Subject", "Body", "f@example.com", ["t@example.com"], headers={"Message-ID": "<1.a@site>"})
    assert DbBackend().send_messages([email]) == 1
    assert Message.objects.get().message_id == "<1.a@site>"

    email.extra_headers["message-id"] = "<2.a@site>"
    try:
        email.message()
    except ValueError:  # Django 6.1: at most one
        with pytest.raises(ValueError, match="at most 1"):
            DbBackend().send_messages([email])
    else:
        assert DbBackend().send_messages([email]) == 1


class Refusing(EmailMessage):
    """A subclass whose rendering fails: its own message() may differ from Django's, so it is always rendered."""

    def message(self, *args, **kwargs):
        raise RuntimeError("refused by the subclass")


@pytest.mark.skipif(django.VERSION < (6, 1), reason="Django before 6.1 sends a Bcc header as it is")
def test_a_bcc_header_is_refused_when_queued_as_django_6_1_refuses_it():
    with pytest.raises(ValueError, match="Bcc is not a valid email header"):
        mailer.send_html_mail("S", "B", "<p>B</p>", "f@example.com", ["t@example.com"], headers={"Bcc": "x@y.com"})
    assert Message.objects.count() == 0
