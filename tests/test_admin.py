"""The admin pages an operator uses, rendered for real."""

import pytest
from django.urls import reverse

import mailer
from mailer import engine
from mailer.models import RESULT_FAILURE, RESULT_SUCCESS, Message, MessageLog

pytestmark = pytest.mark.django_db


def test_message_list_and_detail_show_the_email(admin_client):
    mailer.send_mail("Visible subject", "Plain body", "f@example.com", ["shown@example.com"])
    message = Message.objects.get()

    listing = admin_client.get(reverse("admin:mailer_message_changelist"))
    assert listing.status_code == 200
    assert b"Visible subject" in listing.content and b"shown@example.com" in listing.content

    detail = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))
    assert detail.status_code == 200
    assert b"Plain body" in detail.content


def test_undecodable_rows_do_not_break_the_pages(admin_client):
    message = Message.objects.create(message_data="garbage")
    assert admin_client.get(reverse("admin:mailer_message_changelist")).status_code == 200
    detail = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))
    assert b"Can&#x27;t decode" in detail.content


def test_send_action_delivers_the_selected_messages(admin_client, deliver_to_smtp):
    mailer.send_mail("Chosen", "Body", "f@example.com", ["a@example.com"])
    mailer.send_mail("Not chosen", "Body", "f@example.com", ["b@example.com"])
    chosen = Message.objects.order_by("pk").first()

    response = admin_client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": "send_messages", "_selected_action": [chosen.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Chosen"]
    assert b"Message(s) sent: 1 sent, 0 deferred." in response.content
    assert Message.objects.get().subject == "Not chosen"


def test_log_is_filtered_by_result_and_searched_by_message_id(admin_client, deliver_to_smtp):
    deliver_to_smtp.reject_recipient("bad@example.com")
    mailer.send_mail("Good", "Body", "f@example.com", ["good@example.com"])
    mailer.send_mail("Bad", "Body", "f@example.com", ["bad@example.com"])
    engine.send_all()
    good = MessageLog.objects.get(result=RESULT_SUCCESS)

    url = reverse("admin:mailer_messagelog_changelist")
    failures = admin_client.get(url, {"result__exact": RESULT_FAILURE})
    assert b"bad@example.com" in failures.content and b"good@example.com" not in failures.content

    found = admin_client.get(url, {"q": good.message_id})
    assert b"good@example.com" in found.content and b"bad@example.com" not in found.content

    detail = admin_client.get(reverse("admin:mailer_messagelog_change", args=[good.pk]))
    assert detail.status_code == 200


def test_dont_send_list_admin(admin_client):
    response = admin_client.get(reverse("admin:mailer_dontsendentry_changelist"))
    assert response.status_code == 200


def test_adding_a_dont_send_entry_needs_only_the_address(admin_client):
    from mailer.models import DontSendEntry

    form = admin_client.get(reverse("admin:mailer_dontsendentry_add"))
    assert form.status_code == 200
    initial = form.context["adminform"].form.initial["when_added"]
    response = admin_client.post(
        reverse("admin:mailer_dontsendentry_add"),
        {"to_address": "stop@example.com", "when_added_0": initial.date().isoformat(), "when_added_1": "00:00:00"},
    )
    assert response.status_code == 302
    assert DontSendEntry.objects.has_address("STOP@example.com")


def test_send_action_says_when_nothing_could_be_sent(admin_client, settings):
    settings.MAILER_PAUSE_SEND = True
    mailer.send_mail("Paused", "Body", "f@example.com", ["a@example.com"])
    response = admin_client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": "send_messages", "_selected_action": [Message.objects.get().pk]},
        follow=True,
    )
    assert b"Nothing was sent: sending is paused" in response.content


def test_queue_is_searchable_by_subject_sender_and_recipient(admin_client):
    mailer.send_mail("Invoice 42", "Body", "billing@example.com", ["carol@example.com"])
    mailer.send_mail("Greetings 7", "Body", "hello@example.com", ["dave@example.com"], priority=1)
    url = reverse("admin:mailer_message_changelist")

    for query in ["Invoice", "billing@", "carol"]:
        found = admin_client.get(url, {"q": query}).content
        assert b"Invoice 42" in found and b"Greetings 7" not in found, query
    assert b"Invoice 42" not in admin_client.get(url, {"priority__exact": 1}).content
