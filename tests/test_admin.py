"""The admin pages an operator uses, rendered for real and read as the operator reads them.

Each test parses the HTML the admin returns and looks at what is on the
page: the rows of a list, the fields of a change page, the message an action
leaves. A page that renders (status 200) but shows the wrong row, an empty
field or a wrong count fails.
"""

from html.parser import HTMLParser

import pytest
from django.core.mail import EmailMessage
from django.urls import reverse
from django.utils import timezone

import mailer
from mailer import engine
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db

# --------------------------------------------------------------------------
# Reading a page
# --------------------------------------------------------------------------

VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    """An element of a parsed page: its tag, attributes and children (elements and text)."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: "Node | None") -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag: str, class_: str | None = None) -> list["Node"]:
        return [n for n in self.walk() if n.tag == tag and (class_ is None or class_ in n.classes)]

    def find(self, tag: str, **attrs: str) -> "Node | None":
        for node in self.walk():
            if node.tag == tag and all(node.attrs.get(name) == value for name, value in attrs.items()):
                return node
        return None

    def text(self) -> str:
        """The text a reader sees: entities decoded, ``<br>`` as a line break, runs of spaces and the ends trimmed."""
        lines = "".join(self._raw_text()).split("\n")
        return "\n".join(" ".join(line.split()) for line in lines).strip()

    def _raw_text(self):
        for child in self.children:
            if isinstance(child, str):
                yield child.replace("\n", " ")
            elif child.tag == "br":
                yield "\n"
            else:
                yield from child._raw_text()


class Page(HTMLParser):
    """A tolerant HTML parser that builds a tree of ``Node`` (enough for Django's admin templates)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("document", {}, None)
        self.current = self.root
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {name: value or "" for name, value in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID_ELEMENTS:
            self.current = node

    def handle_endtag(self, tag):
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def page(response) -> Node:
    assert response.status_code == 200, response.status_code
    return Page(response.content.decode(response.charset)).root


def list_rows(response) -> list[dict[str, str]]:
    """The rows of an admin change list, top to bottom, as {column: text shown}."""
    table = page(response).find("table", id="result_list")
    if table is None:
        return []  # the admin shows no table when nothing matches
    rows = []
    for row in table.find_all("tbody")[0].find_all("tr"):
        cells = [cell for cell in row.children if isinstance(cell, Node) and cell.tag in ("th", "td")]
        rows.append(
            {
                name.removeprefix("field-"): cell.text()
                for cell in cells
                for name in cell.classes
                if name.startswith("field-")
            }
        )
    return rows


def shown_fields(response) -> dict[str, str]:
    """The read-only fields of an admin change page, as {field: text shown}."""
    fields = {}
    for row in page(response).find_all("div", "form-row"):
        (name,) = [c.removeprefix("field-") for c in row.classes if c.startswith("field-")]
        readonly = row.find_all("div", "readonly")
        if readonly:
            fields[name] = readonly[0].text()
    return fields


def user_messages(response) -> list[tuple[str, str]]:
    """The messages the admin shows after an action, as (level, text)."""
    found: list[tuple[str, str]] = []
    for listing in page(response).find_all("ul", "messagelist"):
        found.extend((" ".join(sorted(item.classes)), item.text()) for item in listing.find_all("li"))
    return found


def changelist(client, model: str, **query) -> list[dict[str, str]]:
    return list_rows(client.get(reverse(f"admin:mailer_{model}_changelist"), query))


def change_page(client, model: str, pk: int) -> dict[str, str]:
    return shown_fields(client.get(reverse(f"admin:mailer_{model}_change", args=[pk])))


def send_action(client, *messages: Message):
    return client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": "send_messages", "_selected_action": [m.pk for m in messages]},
        follow=True,
    )


def queue(subject: str, to: list[str], **kwargs) -> Message:
    """Queue a message as a site does and return its row."""
    priority = kwargs.pop("priority", None)
    email = EmailMessage(subject, kwargs.pop("body", "Body"), kwargs.pop("from_email", "f@example.com"), to, **kwargs)
    message = Message.for_email(email, priority=priority)
    message.save()
    return message


# --------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------


def test_change_page_shows_subject_sender_recipients_and_the_plain_text_body(admin_client):
    """The operator reads the email itself: every recipient (cc and bcc too) and the text body, decoded."""
    mailer.send_html_mail(
        "Visible subject ✓",
        "Plain body, first line\nsecond line: Grüße",
        "<p>The HTML version</p>",
        "Sender <f@example.com>",
        ["shown@example.com"],
    )
    message = Message.objects.get()

    shown = change_page(admin_client, "message", message.pk)
    assert {name: shown[name] for name in ("subject", "from_email", "recipients", "plain_text_body")} == {
        "subject": "Visible subject ✓",
        "from_email": "Sender <f@example.com>",
        "recipients": "shown@example.com",
        "plain_text_body": "Plain body, first line\nsecond line: Grüße",
    }
    # The HTML part is shown as its source, as text: never rendered.
    assert shown["alternatives"] == "text/html\n<p>The HTML version</p>"
    assert shown["message_id"] == message.message_id and shown["retry_count"] == "0"

    copied = queue("Copies", ["to@example.com"], cc=["cc@example.com"], bcc=["bcc@example.com"])
    shown = change_page(admin_client, "message", copied.pk)
    assert shown["recipients"] == "to@example.com, cc@example.com, bcc@example.com"


def test_queue_list_shows_a_row_per_message_newest_first(admin_client):
    """Each queued message is one row with its recipients, subject and priority, the newest on top."""
    first = queue("First", ["a@example.com", "b@example.com"])
    second = queue("Second", ["c@example.com"], priority=PRIORITY_HIGH)

    rows = changelist(admin_client, "message")

    assert [(r["id"], r["recipients"], r["subject"], r["priority"], r["retry_count"]) for r in rows] == [
        (str(second.pk), "c@example.com", "Second", "high", "0"),
        (str(first.pk), "a@example.com, b@example.com", "First", "medium", "0"),
    ]
    assert all(r["when_added"] for r in rows)


@pytest.mark.parametrize(
    "query",
    ["Invoice", "invoice 42", "billing@", "carol@example.com", "CAROL"],
)
def test_queue_search_finds_only_the_matching_message(admin_client, query):
    """The search looks at subject, sender and recipients, case-insensitively, and shows no other row."""
    queue("Invoice 42", ["carol@example.com"], from_email="billing@example.com")
    queue("Greetings 7", ["dave@example.com"], from_email="hello@example.com")
    queue("Newsletter", ["erin@example.com"], from_email="news@example.com")

    assert [row["subject"] for row in changelist(admin_client, "message", q=query)] == ["Invoice 42"]


def test_queue_search_for_a_word_no_message_has_shows_no_rows(admin_client):
    queue("Invoice 42", ["carol@example.com"])
    assert changelist(admin_client, "message", q="zebra") == []


def test_queue_filter_by_priority_shows_only_that_priority(admin_client):
    queue("Urgent", ["a@example.com"], priority=PRIORITY_HIGH)
    queue("Routine", ["b@example.com"])

    assert [r["subject"] for r in changelist(admin_client, "message", priority__exact=PRIORITY_HIGH)] == ["Urgent"]


def test_an_undecodable_row_is_listed_and_its_page_says_it_cannot_be_decoded(admin_client):
    """A damaged row must not hide the rest of the queue; its page says what is wrong instead of failing."""
    good = queue("Readable", ["a@example.com"])
    damaged = Message.objects.create(message_data="garbage")

    rows = changelist(admin_client, "message")
    # The admin shows "-" for an empty value.
    assert [(r["id"], r["subject"]) for r in rows] == [(str(damaged.pk), "-"), (str(good.pk), "Readable")]

    shown = change_page(admin_client, "message", damaged.pk)
    assert {name: shown[name] for name in ("subject", "from_email", "recipients", "plain_text_body")} == {
        "subject": "-",
        "from_email": "-",
        "recipients": "-",
        "plain_text_body": "Can't decode: message data is neither JSON nor a django-mailer pickle",
    }


# --------------------------------------------------------------------------
# The "send" action
# --------------------------------------------------------------------------


def test_send_action_delivers_only_the_selected_message_and_says_so(admin_client, deliver_to_smtp):
    chosen = queue("Chosen", ["a@example.com"])
    queue("Not chosen", ["b@example.com"])

    response = send_action(admin_client, chosen)

    assert user_messages(response) == [
        ("info", "Message(s) sent: 1 sent, 0 deferred, 0 failed permanently, 0 not sent (don't send list).")
    ]
    [received] = deliver_to_smtp.received
    assert (received.message["Subject"], received.rcpt_tos) == ("Chosen", ["a@example.com"])
    assert [r["subject"] for r in list_rows(response)] == ["Not chosen"]
    assert MessageLog.objects.get().result == RESULT_SUCCESS


def test_send_action_counts_a_refused_message_as_deferred(admin_client, deliver_to_smtp):
    """One accepted, one refused for now by the mail server: the counts say so, and the refused one stays deferred."""
    deliver_to_smtp.reject_recipient("bad@example.com", "450 4.2.1 Mailbox busy, try again later")
    good = queue("Good", ["good@example.com"])
    bad = queue("Bad", ["bad@example.com"])

    response = send_action(admin_client, good, bad)

    assert user_messages(response) == [
        ("info", "Message(s) sent: 1 sent, 1 deferred, 0 failed permanently, 0 not sent (don't send list).")
    ]
    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Good"]
    assert [(r["subject"], r["priority"]) for r in list_rows(response)] == [("Bad", "deferred")]


def test_send_action_says_when_nothing_could_be_sent(admin_client, settings, deliver_to_smtp):
    """With sending paused the action warns, and the message is neither sent nor taken out of the queue."""
    settings.MAILER_PAUSE_SEND = True
    paused = queue("Paused", ["a@example.com"])

    response = send_action(admin_client, paused)

    assert user_messages(response) == [
        ("warning", "Nothing was sent: sending is paused, or another process is sending.")
    ]
    assert deliver_to_smtp.received == []
    assert [r["subject"] for r in list_rows(response)] == ["Paused"]


# --------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------


@pytest.fixture
def sent_and_failed(deliver_to_smtp):
    """One message delivered, one refused by the mail server; their log rows (success, failure)."""
    deliver_to_smtp.reject_recipient("bad@example.com")
    queue("Good", ["good@example.com"], body="The good body")
    queue("Bad", ["bad@example.com"])
    engine.send_all()
    return MessageLog.objects.get(result=RESULT_SUCCESS), MessageLog.objects.get(result=RESULT_FAILURE)


def test_log_list_shows_each_attempt_with_its_result(admin_client, sent_and_failed):
    good, bad = sent_and_failed

    rows = changelist(admin_client, "messagelog")

    assert sorted((r["id"], r["recipients"], r["subject"], r["message_id"], r["result"]) for r in rows) == sorted(
        [
            (str(good.pk), "good@example.com", "Good", good.message_id, "success"),
            (str(bad.pk), "bad@example.com", "Bad", bad.message_id, "failure"),
        ]
    )


def test_log_filter_by_result_shows_only_that_result(admin_client, sent_and_failed):
    assert [r["subject"] for r in changelist(admin_client, "messagelog", result__exact=RESULT_FAILURE)] == ["Bad"]
    assert [r["subject"] for r in changelist(admin_client, "messagelog", result__exact=RESULT_SUCCESS)] == ["Good"]


def test_log_search_by_message_id_finds_only_that_attempt(admin_client, sent_and_failed):
    good, _bad = sent_and_failed
    assert good.message_id

    assert [r["id"] for r in changelist(admin_client, "messagelog", q=good.message_id)] == [str(good.pk)]
    assert [r["id"] for r in changelist(admin_client, "messagelog", q="bad@example")] == [str(_bad.pk)]


def test_log_change_page_shows_the_email_that_was_sent(admin_client, sent_and_failed):
    good, _bad = sent_and_failed

    shown = change_page(admin_client, "messagelog", good.pk)
    assert {name: shown[name] for name in ("subject", "from_email", "recipients", "plain_text_body", "message_id")} == {
        "subject": "Good",
        "from_email": "f@example.com",
        "recipients": "good@example.com",
        "plain_text_body": "The good body",
        "message_id": good.message_id,
    }
    assert shown["result"] == "success"


# --------------------------------------------------------------------------
# The don't-send list
# --------------------------------------------------------------------------


def test_dont_send_list_shows_and_searches_the_addresses(admin_client):
    DontSendEntry.objects.create(to_address="stop@example.com", when_added=timezone.now())
    DontSendEntry.objects.create(to_address="never@example.org", when_added=timezone.now())

    assert sorted(r["to_address"] for r in changelist(admin_client, "dontsendentry")) == [
        "never@example.org",
        "stop@example.com",
    ]
    assert [r["to_address"] for r in changelist(admin_client, "dontsendentry", q="example.org")] == [
        "never@example.org"
    ]


def test_adding_a_dont_send_entry_needs_only_the_address(admin_client, deliver_to_smtp):
    """The form comes filled with the current time; once saved, mail to the address is no longer delivered."""
    form = admin_client.get(reverse("admin:mailer_dontsendentry_add"))
    initial = form.context["adminform"].form.initial["when_added"]
    assert abs((timezone.now() - initial).total_seconds()) < 60

    response = admin_client.post(
        reverse("admin:mailer_dontsendentry_add"),
        {"to_address": "stop@example.com", "when_added_0": initial.date().isoformat(), "when_added_1": "00:00:00"},
        follow=True,
    )

    assert [r["to_address"] for r in list_rows(response)] == ["stop@example.com"]
    mailer.send_mail("Blocked", "Body", "f@example.com", ["STOP@example.com"])
    engine.send_all()
    assert deliver_to_smtp.received == []


# --------------------------------------------------------------------------
# Rows are data: shown escaped, never edited
# --------------------------------------------------------------------------

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def legacy_pickled_row(email) -> str:
    """A row as django-mailer 2.x stored it: base64 of the pickled email."""
    import base64
    import pickle

    return base64.encodebytes(pickle.dumps(email)).decode("ascii")


@pytest.mark.parametrize("stored_as", ["json", "legacy pickle"])
def test_html_in_a_message_is_shown_as_text_on_every_page(admin_client, stored_as):
    """A ``SafeString`` body (what ``render_to_string`` returns) and an HTML part are escaped, never markup."""
    from django.core.mail import EmailMultiAlternatives
    from django.utils.safestring import SafeString

    email = EmailMultiAlternatives(SafeString(XSS), SafeString(XSS), "f@example.com", ["a@example.com"])
    email.attach_alternative(SafeString(XSS), "text/html")
    if stored_as == "json":
        message = Message.for_email(email)
        message.save()
    else:
        message = Message.objects.create(message_data=legacy_pickled_row(email))
    log = MessageLog.objects.log(message, RESULT_FAILURE, log_message=XSS)

    for response in (
        admin_client.get(reverse("admin:mailer_message_changelist")),
        admin_client.get(reverse("admin:mailer_message_change", args=[message.pk])),
        admin_client.get(reverse("admin:mailer_messagelog_changelist")),
        admin_client.get(reverse("admin:mailer_messagelog_change", args=[log.pk])),
    ):
        html = response.content.decode()
        assert "<script>" not in html and "<img src=x" not in html
        assert "&lt;script&gt;" in html
    shown = change_page(admin_client, "message", message.pk)
    assert shown["plain_text_body"] == XSS and shown["alternatives"] == f"text/html\n{XSS}"


def test_the_stored_data_cannot_be_edited_in_the_admin(admin_client):
    """Nothing of a queued message is edited in a form: not the message, its columns, nor its priority.

    (Moving a deferred message back by its priority would bypass
    MAILER_EMAIL_MAX_RETRIES; the defer and retry actions change it.)
    """
    message = queue("Original", ["a@example.com"])
    stored = message.message_data

    response = admin_client.post(
        reverse("admin:mailer_message_change", args=[message.pk]),
        {
            "priority": str(PRIORITY_HIGH),
            "message_data": '{"mailer": 1, "value": "planted"}',
            "recipients": "attacker@example.com",
            "subject": "Changed",
        },
        follow=True,
    )

    assert response.status_code == 200
    message.refresh_from_db()
    assert message.priority == PRIORITY_MEDIUM
    assert message.message_data == stored
    assert (message.subject, message.recipients) == ("Original", "a@example.com")
    assert "message_data" not in change_page(admin_client, "message", message.pk)


def test_messages_cannot_be_added_and_the_log_cannot_be_added_to_or_changed(admin_client):
    """Mail is queued by code and the log is written by the engine: the admin offers neither."""
    queued = queue("Queued", ["a@example.com"])
    log = MessageLog.objects.log(queued, RESULT_FAILURE, log_message="refused")

    assert admin_client.get(reverse("admin:mailer_message_add")).status_code == 403
    assert admin_client.get(reverse("admin:mailer_messagelog_add")).status_code == 403
    response = admin_client.post(
        reverse("admin:mailer_messagelog_change", args=[log.pk]), {"log_message": "rewritten", "result": "1"}
    )
    assert response.status_code == 403
    log.refresh_from_db()
    assert (log.log_message, log.result) == ("refused", RESULT_FAILURE)
    # The page itself is still there to read.
    assert change_page(admin_client, "messagelog", log.pk)["log_message"] == "refused"


# --------------------------------------------------------------------------
# Actions need the change permission and report what happened
# --------------------------------------------------------------------------


def staff_client(client, *codenames: str):
    """A client logged in as a staff user holding only the named mailer permissions."""
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user("operator", password="x", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="mailer", codename__in=codenames))
    client.force_login(user)
    return client


def run_action(client, action: str, *messages: Message):
    return client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": action, "_selected_action": [m.pk for m in messages]},
        follow=True,
    )


@pytest.mark.parametrize("action", ["send_messages", "defer_messages", "retry_messages"])
def test_a_view_only_user_can_run_no_action(client, deliver_to_smtp, action):
    viewer = staff_client(client, "view_message")
    waiting = queue("Waiting", ["a@example.com"])
    deferred = queue("Deferred", ["b@example.com"])
    deferred.defer()

    response = viewer.get(reverse("admin:mailer_message_changelist"))
    assert [r["subject"] for r in list_rows(response)] == ["Deferred", "Waiting"]
    choices = page(response).find("select", name="action")
    assert choices is None or action not in choices.text()

    run_action(viewer, action, waiting, deferred)

    assert deliver_to_smtp.received == []
    assert sorted(Message.objects.values_list("subject", "priority", "retry_count")) == [
        ("Deferred", PRIORITY_DEFERRED, 0),
        ("Waiting", PRIORITY_MEDIUM, 0),
    ]


def test_send_action_sends_no_deferred_message_even_past_max_retries(client, settings, deliver_to_smtp):
    """Deferred mail waits for retry (and MAILER_EMAIL_MAX_RETRIES); "send now" does not bypass it."""
    settings.MAILER_EMAIL_MAX_RETRIES = 0
    changer = staff_client(client, "view_message", "change_message")
    deferred = queue("Deferred", ["b@example.com"])
    deferred.defer()
    ready = queue("Ready", ["a@example.com"])

    response = run_action(changer, "send_messages", deferred, ready)

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Ready"]
    assert user_messages(response) == [
        (
            "info",
            "Message(s) sent: 1 sent, 0 deferred, 0 failed permanently, 0 not sent (don't send list)."
            " 1 deferred message was left as it was.",
        )
    ]
    assert Message.objects.get().priority == PRIORITY_DEFERRED

    run_action(changer, "retry_messages", deferred)
    assert Message.objects.get().priority == PRIORITY_DEFERRED  # past MAILER_EMAIL_MAX_RETRIES


def test_send_action_reports_a_message_kept_from_the_dont_send_list(admin_client, deliver_to_smtp):
    DontSendEntry.objects.create(to_address="stop@example.com", when_added=timezone.now())
    blocked = queue("Blocked", ["stop@example.com"])

    response = send_action(admin_client, blocked)

    assert deliver_to_smtp.received == [] and Message.objects.count() == 0
    assert user_messages(response) == [
        ("info", "Message(s) sent: 0 sent, 0 deferred, 0 failed permanently, 1 not sent (don't send list).")
    ]


def test_send_action_waits_for_no_one_when_another_process_holds_the_lock(admin_client, deliver_to_smtp, lock_path):
    """The action is a pass like any other: with the lock held elsewhere it sends nothing and says so."""
    from tests.locks import LockHolder

    waiting = queue("Waiting", ["a@example.com"])
    holder = LockHolder(lock_path).start()
    try:
        response = send_action(admin_client, waiting)
    finally:
        holder.release()

    assert deliver_to_smtp.received == []
    assert user_messages(response) == [
        ("warning", "Nothing was sent: sending is paused, or another process is sending.")
    ]


def test_defer_and_retry_actions_move_the_selected_messages(client):
    changer = staff_client(client, "view_message", "change_message")
    first = queue("First", ["a@example.com"])
    second = queue("Second", ["b@example.com"])

    response = run_action(changer, "defer_messages", first)
    assert user_messages(response) == [("info", "1 message deferred.")]
    assert dict(Message.objects.values_list("subject", "priority")) == {
        "First": PRIORITY_DEFERRED,
        "Second": PRIORITY_MEDIUM,
    }

    response = run_action(changer, "retry_messages", first, second)
    assert user_messages(response) == [("info", "1 message queued again.")]
    assert dict(Message.objects.values_list("subject", "retry_count")) == {"First": 1, "Second": 0}
