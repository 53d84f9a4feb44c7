"""Routing by alias (Django 6.1): each message leaves through the mailer it was queued through.

A site with two queueing mailers, "default" delivering through one mail
server and "urgent" through another: mail queued with ``using="urgent"``
(through Django's own ``send_mail`` or mailer's) is stored with that alias,
queued at that mailer's priority, and delivered by that mailer's
``deliver_using``, while everything else keeps the default route. Two real
SMTP servers on loopback tell the routes apart.
"""

import logging
import socket

import django
import pytest
from django.core import mail
from django.db import connection

import mailer
from mailer import engine
from mailer.models import PRIORITY_DEFERRED, Message, MessageLog
from mailer.priority import PRIORITY_HIGH, PRIORITY_MEDIUM
from tests.smtp import SMTPServer

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1"),
]

DB = "mailer.backend.DbBackend"
SMTP = "django.core.mail.backends.smtp.EmailBackend"


@pytest.fixture
def urgent_server():
    server = SMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def two_routes(settings, smtp_server, urgent_server):
    """The default mailer queues for ``smtp_server``; "urgent" queues at high priority for ``urgent_server``."""
    if hasattr(settings, "MAILER_EMAIL_BACKEND"):
        del settings.MAILER_EMAIL_BACKEND
    settings.MAILERS = {
        "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}},
        "urgent": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp_urgent", "priority": "high"}},
        "smtp": {"BACKEND": SMTP, "OPTIONS": {"host": smtp_server.host, "port": smtp_server.port, "timeout": 10}},
        "smtp_urgent": {
            "BACKEND": SMTP,
            "OPTIONS": {"host": urgent_server.host, "port": urgent_server.port, "timeout": 10},
        },
    }
    return smtp_server, urgent_server


def subjects(server: SMTPServer) -> list[str]:
    return sorted(received.message["Subject"] for received in server.received)


def test_mail_queued_through_an_alias_leaves_through_its_deliver_using(two_routes):
    default_server, urgent_server = two_routes
    mail.send_mail("Weekly digest", "Body", "from@example.com", ["to@example.com"])
    mail.send_mail("Password reset", "Body", "from@example.com", ["to@example.com"], using="urgent")
    mailer.send_mail("Sign-up", "Body", "from@example.com", ["to@example.com"], using="urgent")
    mailer.send_mail("Invoice", "Body", "from@example.com", ["to@example.com"])

    queued = {m.subject: m for m in Message.objects.all()}
    assert {subject: (m.mailer_alias, m.priority) for subject, m in queued.items()} == {
        "Weekly digest": ("default", PRIORITY_MEDIUM),
        "Password reset": ("urgent", PRIORITY_HIGH),
        "Sign-up": ("urgent", PRIORITY_HIGH),
        "Invoice": ("default", PRIORITY_MEDIUM),
    }

    Message.objects.filter(pk=queued["Invoice"].pk).update(mailer_alias=None)  # as if queued before 0014

    assert engine.send_all() == {"sent": 4}

    assert subjects(urgent_server) == ["Password reset", "Sign-up"]
    assert subjects(default_server) == ["Invoice", "Weekly digest"]
    # Interleaved routes keep one session each for the whole pass; "default" and no alias are one route.
    assert (urgent_server.connections, default_server.connections) == (1, 1)
    assert MessageLog.objects.filter(result="1").count() == 4


def test_bulk_queueing_through_an_alias_is_routed_too(two_routes):
    default_server, urgent_server = two_routes
    messages = [mail.EmailMessage(f"Alert {n}", "Body", "from@example.com", ["to@example.com"]) for n in range(3)]
    with mail.mailers["urgent"] as connection:
        connection.send_messages(messages)
    mailer.send_mass_mail([("Batch", "Body", "from@example.com", ["to@example.com"])], using="urgent")

    engine.send_all()

    assert subjects(urgent_server) == ["Alert 0", "Alert 1", "Alert 2", "Batch"]
    assert default_server.received == []


def test_messages_queued_before_routing_keep_the_default_route(two_routes):
    default_server, urgent_server = two_routes
    mailer.send_mail("Queued by an older release", "Body", "from@example.com", ["to@example.com"])
    Message.objects.update(mailer_alias=None)  # as every row queued before migration 0014

    engine.send_all()

    assert subjects(default_server) == ["Queued by an older release"]
    assert urgent_server.received == []


def test_mail_queued_through_a_mailer_since_removed_leaves_the_default_way_with_a_warning(settings, two_routes, caplog):
    default_server, urgent_server = two_routes
    mail.send_mail("Urgent", "Body", "from@example.com", ["to@example.com"], using="urgent")
    del settings.MAILERS["urgent"]  # the site dropped the alias with mail still queued through it

    assert engine.send_all() == {"sent": 1}

    assert subjects(default_server) == ["Urgent"]
    assert urgent_server.received == []
    assert "'urgent', which is no longer in MAILERS" in caplog.text


def test_a_route_whose_mailer_cannot_be_made_sets_its_own_mail_aside_and_the_others_go_on(settings, two_routes):
    default_server, urgent_server = two_routes
    mail.send_mail("Urgent", "Body", "from@example.com", ["to@example.com"], using="urgent")
    mail.send_mail("Ordinary", "Body", "from@example.com", ["to@example.com"])
    settings.MAILERS["smtp_urgent"]["OPTIONS"]["prot"] = 25  # a typo: Django's SMTP backend refuses it

    assert engine.send_all() == {"sent": 1, "deferred": 1}
    assert engine.send_all() is not None  # and again: the broken route does not stop the queue

    assert subjects(default_server) == ["Ordinary"]
    assert urgent_server.received == []
    kept = Message.objects.get()
    assert (kept.subject, kept.mailer_alias) == ("Urgent", "urgent")
    assert "prot" in MessageLog.objects.get(result="3").log_message

    del settings.MAILERS["smtp_urgent"]["OPTIONS"]["prot"]
    Message.objects.retry_deferred()
    assert engine.send_all() == {"sent": 1}
    assert subjects(urgent_server) == ["Urgent"]


def test_a_site_back_on_the_classic_settings_sends_routed_mail_the_default_way(settings, two_routes):
    default_server, urgent_server = two_routes
    mail.send_mail("Urgent", "Body", "from@example.com", ["to@example.com"], using="urgent")
    del settings.MAILERS
    settings.MAILER_EMAIL_BACKEND = SMTP
    settings.EMAIL_HOST, settings.EMAIL_PORT = default_server.host, default_server.port

    assert engine.send_all() == {"sent": 1}
    assert subjects(default_server) == ["Urgent"]


def test_mailer_email_backend_delivers_all_queued_mail_whatever_it_was_queued_through(settings, two_routes):
    """With MAILER_EMAIL_BACKEND set, deliver_using is ignored (check mailer.W001 says so), for routed mail too."""
    default_server, urgent_server = two_routes
    mail.send_mail("Urgent", "Body", "from@example.com", ["to@example.com"], using="urgent")
    settings.MAILER_EMAIL_BACKEND = SMTP  # MAILERS["smtp"] uses it: that mailer delivers

    assert engine.send_all() == {"sent": 1}
    assert subjects(default_server) == ["Urgent"]
    assert urgent_server.received == []


# --------------------------------------------------------------------------
# An outage on one route: that route waits, the others go on
# --------------------------------------------------------------------------


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def outage_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mailer")]


def assert_waiting_untouched(messages) -> None:
    """The messages are in the queue as they were queued: not deferred, not claimed, never tried."""
    assert [(m.priority, m.retry_count, m.claimed_until) for m in messages] == [
        (messages[0].priority, 0, None) for _m in messages
    ]
    assert messages[0].priority != PRIORITY_DEFERRED


def test_a_route_whose_server_is_down_waits_and_the_other_routes_go_on(two_routes, caplog):
    """A partner's mail server turns every session away: the password resets on the default route must still
    go out, though the partner's mail is first in the queue (queued at high priority) and fills the first
    claims. Its server is tried once in the pass: a server that hangs costs one timeout, not one per message.
    """
    default_server, urgent_server = two_routes
    urgent_server.limit_sessions(0)  # 421 at the greeting, to every session
    for n in range(12):
        mailer.send_mail(f"Partner {n}", "Body", "from@example.com", ["to@example.com"], using="urgent")
    for n in range(3):
        mailer.send_mail(f"Reset {n}", "Body", "from@example.com", ["to@example.com"])

    assert engine.send_all() == {"sent": 3, "deferred": 1}

    assert subjects(default_server) == ["Reset 0", "Reset 1", "Reset 2"]
    partner = Message.objects.filter(mailer_alias="urgent")
    assert partner.deferred().count() == 1  # the one that met the outage, as after any outage
    assert_waiting_untouched(list(partner.non_deferred()))
    assert partner.non_deferred().count() == 11
    assert MessageLog.objects.filter(result="3").count() == 1  # no row for the messages given back
    assert urgent_server.sessions_refused == 1
    [error] = outage_errors(caplog)
    assert "MAILERS['smtp_urgent']" in error and "cannot be reached" in error
    assert "the rest of the queue goes on" in error


def test_the_default_route_down_does_not_hold_up_the_other_routes(settings, two_routes, closed_port):
    _default_server, urgent_server = two_routes
    settings.MAILERS["smtp"]["OPTIONS"]["port"] = closed_port
    for n in range(8):
        mailer.send_mail(f"Ordinary {n}", "Body", "from@example.com", ["to@example.com"], priority=PRIORITY_HIGH)
    for n in range(2):
        mailer.send_mail(f"Urgent {n}", "Body", "from@example.com", ["to@example.com"], using="urgent")

    assert engine.send_all() == {"sent": 2, "deferred": 1}

    assert subjects(urgent_server) == ["Urgent 0", "Urgent 1"]
    ordinary = Message.objects.exclude(mailer_alias="urgent")
    assert ordinary.deferred().count() == 1
    assert_waiting_untouched(list(ordinary.non_deferred()))
    assert ordinary.non_deferred().count() == 7


def test_with_every_route_down_the_pass_ends_after_one_message_of_each(settings, two_routes, closed_port, caplog):
    settings.MAILERS["smtp"]["OPTIONS"]["port"] = closed_port
    settings.MAILERS["smtp_urgent"]["OPTIONS"]["port"] = closed_port
    for n in range(20):
        mailer.send_mail(f"Ordinary {n}", "Body", "from@example.com", ["to@example.com"])
        mailer.send_mail(f"Urgent {n}", "Body", "from@example.com", ["to@example.com"], using="urgent")

    assert engine.send_all() == {"deferred": 2}

    assert Message.objects.deferred().count() == 2
    assert_waiting_untouched(list(Message.objects.non_deferred().filter(mailer_alias="urgent")))
    assert_waiting_untouched(list(Message.objects.non_deferred().exclude(mailer_alias="urgent")))
    assert MessageLog.objects.count() == 2
    assert len(outage_errors(caplog)) == 2
    assert "the pass ends" in outage_errors(caplog)[-1]


@pytest.mark.django_db(transaction=True)
def test_a_hung_route_does_not_take_the_connections_of_the_others(settings, two_routes, caplog):
    """A partner's server that accepts connections and never answers is an outage, not a limit on sessions:
    the connections that waited on it go on with the default route's mail rather than stopping.
    """
    if connection.vendor == "sqlite":
        pytest.skip("several connections need a database file (tests/test_many_senders.py covers SQLite)")
    default_server, _urgent_server = two_routes
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(50)  # accepts, never greets
        settings.MAILERS["smtp_urgent"]["OPTIONS"].update(port=silent.getsockname()[1], timeout=1)
        default_server.delay_each_message(0.05)
        for n in range(12):
            mailer.send_mail(f"Partner {n}", "Body", "from@example.com", ["to@example.com"], using="urgent")
        for n in range(80):  # about 4 s of work for one connection: plenty left once the others are back
            mailer.send_mail(f"Ordinary {n}", "Body", "from@example.com", ["to@example.com"])

        counts = engine.send_all(connections=4)

    assert counts is not None and counts["sent"] == 80 and len(default_server.received) == 80
    assert default_server.connections >= 3, "connections that met the hung route stopped"
    assert not [r for r in caplog.records if "would not take another session" in r.getMessage()]
    assert Message.objects.count() == 12 and not Message.objects.filter(claimed_until__isnull=False).exists()
