"""Mailer's exceptions: one base, and the standard types callers already catch."""

import django
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.message import BadHeaderError

import mailer
from mailer.codec import decode
from mailer.exceptions import (
    ConfigurationError,
    InvalidAddress,
    InvalidDeliveryMailer,
    InvalidHeader,
    MailerError,
    RefusedPickle,
    SentButNotRecorded,
    UndecodableData,
    UnstorableEmail,
)


@pytest.mark.parametrize(
    "error, also",
    [
        (ConfigurationError, ImproperlyConfigured),
        (InvalidDeliveryMailer, ImproperlyConfigured),
        (UnstorableEmail, ValueError),
        (InvalidAddress, ValueError),
        (InvalidHeader, ValueError),
        (InvalidHeader, BadHeaderError),
        (UndecodableData, ValueError),
        (RefusedPickle, UndecodableData),
        (SentButNotRecorded, MailerError),
    ],
)
def test_every_error_is_a_mailer_error_and_what_callers_already_catch(error, also):
    assert issubclass(error, MailerError)
    assert issubclass(error, also)


@pytest.mark.skipif(django.VERSION < (6, 1), reason="InvalidMailer is new in Django 6.1")
def test_a_bad_delivering_mailer_is_djangos_invalid_mailer_on_6_1():
    from django.core.mail.exceptions import InvalidMailer

    error = InvalidDeliveryMailer("OPTIONS must define 'deliver_using'.", alias="default")
    assert isinstance(error, InvalidMailer)
    assert str(error) == "MAILERS['default']: OPTIONS must define 'deliver_using'."


def test_a_configuration_error_carries_the_id_and_hint_of_the_check_that_reports_it():
    error = InvalidDeliveryMailer("no deliver_using", alias="default", check_id="mailer.E001", hint="Set it.")
    assert (error.check_id, error.hint, error.alias) == ("mailer.E001", "Set it.", "default")
    assert str(error) == "MAILERS['default']: no deliver_using"


def test_a_wrong_admins_setting_is_a_configuration_error(settings):
    settings.ADMINS = "ada@example.com"
    with pytest.raises(ConfigurationError, match="The ADMINS setting must be a list"):
        mailer.mail_admins("Subject", "Body")


def test_unreadable_data_is_an_undecodable_data_error_with_its_cause():
    with pytest.raises(UndecodableData, match="not valid JSON") as caught:
        decode("{not json")
    assert isinstance(caught.value.__cause__, ValueError)
