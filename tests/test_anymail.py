"""django-anymail's messages go through the queue whole.

Sites that deliver through an ESP with django-anymail put the ESP's
features on the message itself: ``AnymailMessage`` (or any ``EmailMessage``)
carries tags, metadata, merge data, a template, tracking flags, a scheduled
send time... The queue stores messages as JSON now, so these attributes are
what is most at risk: each must come back equal and of the same type, and
the message must come back as an ``AnymailMessage``, or the ESP silently
sends something else. Delivery goes through anymail's own test backend, which
records the message it was given and the parameters it would send to the ESP.

What JSON cannot hold exactly (a function, an arbitrary object) is refused
when the message is queued, with an error that names the attribute, rather
than lost or mangled when it is sent.
"""

import base64
import datetime
import pickle
from typing import Any

import pytest
from anymail.message import AnymailMessage
from anymail.utils import UNSET
from django.core import mail
from django.core.mail import EmailMessage

from mailer import engine
from mailer.backend import DbBackend
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db

ANYMAIL_TEST_BACKEND = "anymail.backends.test.EmailBackend"

# A one-pixel GIF.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

# Not UTC, with microseconds: a format that drops either changes when the ESP sends.
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
SEND_AT = datetime.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=IST)

ESP_FEATURES: dict[str, Any] = {
    "tags": ["welcome", "onboarding"],
    "metadata": {
        "user": {"id": 42, "plan": "pro", "flags": ["beta", "vip"], "score": 9.5, "active": True, "referrer": None}
    },
    "merge_data": {"ann@example.com": {"name": "Ann", "order": {"id": 7, "lines": [1, 2]}}},
    "merge_global_data": {"site": "Example", "year": 2030},
    "template_id": "welcome-v2",
    "esp_extra": {"custom_param": {"deep": [1, "two", {"three": 3.0}]}},
    "track_clicks": True,
    "send_at": SEND_AT,
    "envelope_sender": "bounces@example.com",
}

# Attributes AnymailMessage has but this message leaves unset.
LEFT_UNSET = ["track_opens", "merge_headers", "merge_metadata"]


@pytest.fixture
def deliver_to_anymail(settings):
    """Deliver queued mail through anymail's test backend, which records into ``mail.outbox``.

    ``MAILER_EMAIL_BACKEND`` set explicitly decides delivery on every Django
    version (on 6.1 it wins over the ``MAILERS`` of the test settings). The
    backend is then created directly, without a ``MAILERS`` alias; anymail
    15 does that without a warning, which this suite would turn into an error.
    """
    settings.MAILER_EMAIL_BACKEND = ANYMAIL_TEST_BACKEND
    mail.outbox = []
    return mail.outbox


def anymail_message() -> tuple[AnymailMessage, str]:
    """An AnymailMessage using every ESP feature, an HTML alternative and an inline image; and the image's cid."""
    message = AnymailMessage(
        subject="Welcome, Ann",
        body="Hello Ann",
        from_email="Shop <shop@example.com>",
        to=["ann@example.com"],
        **ESP_FEATURES,
    )
    cid = message.attach_inline_image(GIF, "logo.gif")
    message.attach_alternative(f'<p>Hello Ann <img src="cid:{cid}"></p>', "text/html")
    return message, cid


def test_an_anymail_message_is_delivered_with_every_feature_intact(deliver_to_anymail):
    """Queued through ``DbBackend``, sent by the engine: the ESP sees what the site queued."""
    queued, cid = anymail_message()
    assert DbBackend().send_messages([queued]) == 1

    engine.send_all()

    assert Message.objects.count() == 0
    assert MessageLog.objects.get().result == RESULT_SUCCESS
    (sent,) = deliver_to_anymail
    assert type(sent) is AnymailMessage

    for name, value in ESP_FEATURES.items():
        assert getattr(sent, name) == value, name
        assert type(getattr(sent, name)) is type(value), name
    assert sent.send_at.utcoffset() == SEND_AT.utcoffset()
    for name in LEFT_UNSET:
        assert getattr(sent, name, UNSET) is UNSET, f"{name} should still be unset"
    assert (sent.subject, sent.body, sent.from_email, sent.to) == (
        "Welcome, Ann",
        "Hello Ann",
        "Shop <shop@example.com>",
        ["ann@example.com"],
    )
    assert [tuple(alternative) for alternative in sent.alternatives] == [
        (f'<p>Hello Ann <img src="cid:{cid}"></p>', "text/html")
    ]

    # What anymail would send to the ESP, feature by feature.
    params = sent.anymail_test_params
    for name in ("tags", "metadata", "merge_data", "merge_global_data", "template_id", "track_clicks", "send_at"):
        assert params[name] == ESP_FEATURES[name], name
    assert params["envelope_sender"] == "bounces@example.com"
    assert params["custom_param"] == ESP_FEATURES["esp_extra"]["custom_param"]
    assert params["is_batch_send"] is True  # merge_data makes it a batch send
    assert "track_opens" not in params and "merge_headers" not in params and "merge_metadata" not in params
    (image,) = params["attachments"]
    assert (image.inline, image.cid, image.name, image.mimetype, image.content) == (
        True,
        cid,
        "logo.gif",
        "image/gif",
        GIF,
    )


def test_the_anymail_message_is_sent_once(deliver_to_anymail):
    """After delivery the engine stores the message as the backend left it, for the log.

    anymail's backends add attributes that are not plain data
    (``anymail_status``, here also ``anymail_test_params``). Storing the
    delivered message must not fail on them: a failure after the ESP
    accepted the message would leave it queued, and the next pass would send
    it again.
    """
    queued, _cid = anymail_message()
    Message.for_email(queued).save()

    engine.send_all()
    engine.send_all()

    assert len(deliver_to_anymail) == 1
    assert Message.objects.count() == 0
    assert list(MessageLog.objects.values_list("result", flat=True)) == [RESULT_SUCCESS]


def test_a_queued_anymail_message_reads_back_as_itself():
    """``Message.email`` gives back an AnymailMessage with the same features, before any delivery."""
    queued, _cid = anymail_message()
    Message.for_email(queued).save()

    stored = Message.objects.get().email

    assert type(stored) is AnymailMessage
    for name, value in ESP_FEATURES.items():
        assert getattr(stored, name) == value, name


class NotPlainData:
    """An arbitrary object: JSON cannot hold it, and guessing how to would send something else."""


def _not_plain_values():
    """(attribute, value, what the error must say): the path to the value and the type that is not plain data."""
    return [
        pytest.param(
            "callback", lambda: None, r"email\.callback cannot be stored: a builtins\.function", id="function"
        ),
        pytest.param(
            "widget",
            NotPlainData(),
            r"email\.widget cannot be stored: a tests\.test_anymail\.NotPlainData",
            id="object",
        ),
        pytest.param(
            "metadata",
            {"user": {"profile": NotPlainData()}},
            r"email\.metadata\['user'\]\['profile'\] cannot be stored: a tests\.test_anymail\.NotPlainData",
            id="object-inside-metadata",
        ),
        pytest.param(
            "esp_extra",
            {"hook": print},
            r"email\.esp_extra\['hook'\] cannot be stored: a builtins\.builtin_function_or_method",
            id="builtin-inside-esp_extra",
        ),
    ]


@pytest.mark.parametrize("attribute, value, error", _not_plain_values())
def test_an_attribute_that_is_not_plain_data_is_refused_when_queued(attribute, value, error):
    """``DbBackend.send_messages`` raises ValueError naming the attribute; nothing is queued.

    The message that would have queued fine beside it is not queued either:
    the call fails as a whole, so the caller can fix and resend the batch.
    """
    good, _cid = anymail_message()
    bad, _cid = anymail_message()
    setattr(bad, attribute, value)

    with pytest.raises(ValueError, match=error):
        DbBackend().send_messages([good, bad])

    assert Message.objects.count() == 0


@pytest.mark.parametrize("attribute, value, error", _not_plain_values())
def test_for_email_refuses_it_too_for_any_email_class(attribute, value, error):
    """The same refusal through ``Message.for_email``, for a plain Django EmailMessage with an added attribute."""
    email = EmailMessage("S", "B", "f@example.com", ["t@example.com"])
    setattr(email, attribute, value)

    with pytest.raises(ValueError, match=error):
        Message.for_email(email)

    assert Message.objects.count() == 0


def legacy_row(message: AnymailMessage) -> str:
    """An AnymailMessage as django-mailer 2.x stored it: base64 of its pickle."""
    return base64.encodebytes(pickle.dumps(message)).decode("ascii")


def test_a_legacy_pickled_anymail_message_is_set_aside_not_sent(deliver_to_anymail):
    """An AnymailMessage queued by django-mailer 2.x is not one of the email classes the legacy reader admits.

    It is not lost: it stays in the queue, deferred, with a log row that
    names the class, so the operator can admit it and retry.
    """
    queued, _cid = anymail_message()
    row = Message.objects.create(message_data=legacy_row(queued))

    engine.send_all()

    assert deliver_to_anymail == []
    row.refresh_from_db()
    assert row.priority == PRIORITY_DEFERRED
    failure = MessageLog.objects.get()
    assert failure.result == RESULT_FAILURE
    assert "AnymailMessage" in failure.log_message


def test_a_legacy_pickled_anymail_message_is_delivered_once_admitted(settings, deliver_to_anymail):
    """With ``AnymailMessage`` admitted by ``MAILER_LEGACY_PICKLE_CLASSES``, the old row is delivered intact.

    The setting is the one docs/storage.rst gives: the message class alone.
    The ``AnymailStatus`` and ``UNSET`` marker the pickle also names are not
    plain data, and keep the values the class's constructor gives them.
    """
    settings.MAILER_LEGACY_PICKLE_CLASSES = ["anymail.message.AnymailMessage"]
    queued, cid = anymail_message()
    Message.objects.create(message_data=legacy_row(queued))

    engine.send_all()

    (sent,) = deliver_to_anymail
    assert type(sent) is AnymailMessage
    for name, value in ESP_FEATURES.items():
        assert getattr(sent, name) == value, name
    (image,) = sent.anymail_test_params["attachments"]
    assert (image.cid, image.content) == (cid, GIF)
    assert Message.objects.count() == 0
