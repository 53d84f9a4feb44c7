"""mailer's send functions take what Django's own take on the installed Django, plus ``priority``.

Code written for ``django.core.mail`` keeps working when it imports from
``mailer`` instead: the same arguments are accepted, the same deprecated ones
warn with Django's own words (and only where Django's would), the same
combinations are refused, and django-mailer 2.x's positional calls still mean
what they meant.
"""

import warnings

import django
import pytest
from django.core import mail
from django.core.mail import EmailMultiAlternatives

import mailer
from mailer.models import Message
from mailer.priority import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_MEDIUM

DB = "mailer.backend.DbBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"
HAS_USING = django.VERSION >= (6, 1)
pytestmark = pytest.mark.django_db
needs_mailers = pytest.mark.skipif(not HAS_USING, reason="MAILERS and using arrived in Django 6.1")

ARGS = ("Subject", "Body", "from@example.com", ["to@example.com"])
STAFF_ARGS = ("Subject", "Body")


def locmem_connection():
    """A connection object to pass as ``connection``, made the way Django lets a caller make one."""
    if HAS_USING:
        return mail.mailers.get("default") or mail.mailers["default"]
    return mail.get_connection(LOCMEM)


def outcome(call):
    """Return what ``call()`` warns ((category, text) of each warning) and raises (an exception type or None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except TypeError as exc:
            raised: type[Exception] | None = type(exc)
        else:
            raised = None
    return sorted((w.category.__name__, str(w.message)) for w in caught), raised


ARGUMENT_SETS = [
    {},
    {"fail_silently": False},
    {"fail_silently": True},
    {"auth_user": "user"},
    {"auth_password": "secret"},
    {"connection": "connection"},
    {"connection": "connection", "fail_silently": True},
    {"connection": "connection", "auth_user": "user", "auth_password": "secret"},
    {"using": "default"},
    {"using": "default", "connection": "connection"},
    {"using": "default", "fail_silently": True},
    {"using": "default", "auth_user": "user"},
]


def with_connection(arguments):
    return {key: locmem_connection() if value == "connection" else value for key, value in arguments.items()}


@pytest.mark.parametrize("arguments", ARGUMENT_SETS, ids=lambda arguments: ",".join(arguments) or "none")
@pytest.mark.parametrize(
    "name, args",
    [("send_mail", ARGS), ("send_mass_mail", ([ARGS],)), ("mail_admins", STAFF_ARGS), ("mail_managers", STAFF_ARGS)],
)
def test_warnings_and_refusals_are_djangos_own(settings, name, args, arguments):
    """Whatever Django's function warns or refuses for these arguments, mailer's does; nothing else."""
    # Each Django's own style: Django 5.2 takes only (name, address) pairs, 6.0 deprecates them.
    staff = ["admin@example.com"] if django.VERSION >= (6, 0) else [("Admin", "admin@example.com")]
    settings.ADMINS = settings.MANAGERS = staff
    if name.startswith("mail_") and {"auth_user", "auth_password"} & set(arguments):
        pytest.skip("mail_admins and mail_managers take no auth_user or auth_password")
    if "using" in arguments and HAS_USING:
        # Both must find a mailer to accept it: Django's sends through it, mailer's queues through it.
        settings.MAILERS = {"default": {"BACKEND": DB}}

    djangos = outcome(lambda: getattr(mail, name)(*args, **with_connection(arguments)))
    ours = outcome(lambda: getattr(mailer, name)(*args, **with_connection(arguments)))

    assert ours == djangos
    if ours == ([], None):
        assert Message.objects.exists()


@pytest.mark.skipif(not HAS_USING, reason="Django 6.1 deprecates these arguments")
def test_a_deprecation_warning_names_the_line_that_passed_the_argument():
    with pytest.warns(PendingDeprecationWarning, match="'fail_silently' argument is deprecated") as caught:
        mailer.send_mail(*ARGS, fail_silently=True)
    [warning] = caught
    assert warning.filename == __file__


def test_html_message_makes_an_email_with_an_html_alternative():
    mailer.send_mail(*ARGS, html_message="<p>Body</p>")

    email = Message.objects.get().email
    assert isinstance(email, EmailMultiAlternatives)
    assert email.body == "Body"
    assert [tuple(alternative) for alternative in email.alternatives] == [("<p>Body</p>", "text/html")]


def test_without_html_message_the_email_stays_plain():
    mailer.send_mail(*ARGS)
    assert not isinstance(Message.objects.get().email, EmailMultiAlternatives)


@pytest.mark.parametrize("function, setting", [(mailer.mail_admins, "ADMINS"), (mailer.mail_managers, "MANAGERS")])
def test_mail_admins_and_managers_take_html_message(settings, function, setting):
    setattr(settings, setting, ["staff@example.com"])
    assert function("Broken", "Traceback", html_message="<pre>Traceback</pre>") == 1
    email = Message.objects.get().email
    assert [tuple(alternative) for alternative in email.alternatives] == [("<pre>Traceback</pre>", "text/html")]


def test_django_mailer_2_positional_calls_keep_their_meaning(settings, recwarn):
    """django-mailer 2.x took priority fifth (where Django takes fail_silently): no warning, same meaning."""
    settings.ADMINS = ["admin@example.com"]
    mailer.send_mail("One", "Body", "f@example.com", ["t@example.com"], PRIORITY_HIGH, False, None, None)
    mailer.send_html_mail(
        "Two", "Body", "<p>Body</p>", "f@example.com", ["t@example.com"], PRIORITY_LOW, False, None, None, {"X-A": "1"}
    )
    mailer.send_mass_mail([("Three", "Body", "f@example.com", ["t@example.com"])], False, None, None, None)
    mailer.mail_admins("Four", "Body", False, None, PRIORITY_LOW)

    queued = {message.subject.removeprefix(settings.EMAIL_SUBJECT_PREFIX): message for message in Message.objects.all()}
    assert {subject: message.priority for subject, message in queued.items()} == {
        "One": PRIORITY_HIGH,
        "Two": PRIORITY_LOW,
        "Three": PRIORITY_MEDIUM,
        "Four": PRIORITY_LOW,
    }
    assert queued["Two"].email.extra_headers == {
        "X-A": "1",
        "Message-ID": queued["Two"].email.extra_headers["Message-ID"],
    }
    assert not recwarn.list


def test_a_bad_priority_raises_when_called_and_queues_nothing():
    with pytest.raises(ValueError, match="Invalid priority 9"):
        mailer.send_mail(*ARGS, priority=9)
    assert not Message.objects.exists()


@pytest.mark.skipif(HAS_USING, reason="using arrived in Django 6.1")
@pytest.mark.parametrize("function, args", [(mailer.send_mail, ARGS), (mailer.send_mass_mail, ([ARGS],))])
def test_using_is_refused_before_django_6_1_as_django_refuses_it(function, args):
    with pytest.raises(TypeError, match="using"):
        function(*args, using="default")


@needs_mailers
class TestUsing:
    @pytest.fixture(autouse=True)
    def mailers(self, settings):
        settings.MAILERS = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priority": "high"}},
            "bulk": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priority": "low"}},
            "smtp": {"BACKEND": LOCMEM},
        }

    def test_the_queue_mailer_named_gives_its_priority(self):
        mailer.send_mail(*ARGS, using="bulk")
        mailer.send_mass_mail([ARGS, ARGS], using="bulk")
        assert [message.priority for message in Message.objects.all()] == [PRIORITY_LOW] * 3

    def test_without_using_the_default_queue_mailer_gives_its_priority(self):
        mailer.send_mail(*ARGS)
        assert Message.objects.get().priority == PRIORITY_HIGH

    def test_an_explicit_priority_wins(self):
        mailer.send_mail(*ARGS, using="bulk", priority=PRIORITY_MEDIUM)
        assert Message.objects.get().priority == PRIORITY_MEDIUM

    def test_an_unknown_mailer_raises_when_called(self):
        from django.core.mail import MailerDoesNotExist

        with pytest.raises(MailerDoesNotExist, match="'blk'"):
            mailer.send_mail(*ARGS, using="blk")
        assert not Message.objects.exists()

    def test_a_mailer_that_sends_at_once_is_refused_when_called(self):
        with pytest.raises(ValueError, match=r"using='smtp' names a mailer that sends at once"):
            mailer.send_mail(*ARGS, using="smtp")
        assert not Message.objects.exists()
