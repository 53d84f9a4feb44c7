"""System checks: ``manage.py check`` (and every ``runserver`` and ``migrate``)
reports a configuration that could not queue or deliver mail, before any
mail is lost to it.

Each problem has a stable id, so a site can silence one with
``SILENCED_SYSTEM_CHECKS``:

- ``mailer.E001``: nothing says how queued mail is delivered (a ``DbBackend``
  default mailer without ``deliver_using``, or no default mailer at all);
- ``mailer.E002``: ``deliver_using`` names a mailer that is not in ``MAILERS``;
- ``mailer.E003``: ``deliver_using`` names another queue (``DbBackend``);
- ``mailer.E004``: a ``DbBackend`` mailer's ``priority`` option is not a priority;
- ``mailer.E005``: ``MAILER_EMAIL_BACKEND`` names the queue itself;
- ``mailer.E006``: any other ``OPTIONS`` of a ``DbBackend`` mailer that it refuses;
- ``mailer.E007``: ``MAILER_EMAIL_BACKEND`` cannot be imported;
- ``mailer.E008``: with ``MAILERS``, ``MAILER_EMAIL_BACKEND`` names Django's SMTP
  backend but no ``MAILERS`` entry uses it;
- ``mailer.E010``: the mailer that delivers queued mail cannot be made (its
  ``BACKEND`` cannot be imported, or it refuses its ``OPTIONS``);
- ``mailer.W001``: a ``deliver_using`` option that ``MAILER_EMAIL_BACKEND`` overrides.

(``mailer.E009`` is ``mailer.tasks``'s: :setting:`MAILER_TASK_BACKEND`.)

The checks run the code that sending runs (``mailer.delivery``, ``DbBackend``),
so what they report is what ``send_mail`` would refuse, in the same words.
"""

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from mailer import conf, delivery
from mailer.exceptions import ConfigurationError


def check_mail_delivery(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Report every setting that would keep mail from being queued or delivered."""
    problems: list[CheckMessage] = []
    if conf.is_set("MAILER_EMAIL_BACKEND"):
        problems += _check_mailer_email_backend()
    if delivery.mailers_configured():
        queues = [alias for alias in settings.MAILERS if delivery.is_queue(delivery.backend_path(alias))]
        for alias in queues:
            problems += _check_queue_mailer(alias)
        problems += _check_route(queues)
    else:
        problems += _as_messages(delivery.check_delivery_route) or _check_delivering_mailer()
    # The default mailer's route is checked both as a mailer's and as the default route.
    unique: list[CheckMessage] = []
    for problem in problems:
        if problem not in unique:
            unique.append(problem)
    return unique


def _check_mailer_email_backend() -> list[CheckMessage]:
    path = conf.get_setting("MAILER_EMAIL_BACKEND")
    try:
        import_string(path)
    except ImportError as exc:
        return [
            Error(
                f"MAILER_EMAIL_BACKEND names {path!r}, which cannot be imported: {exc}",
                hint="Name the email backend class that delivers queued mail, "
                f"such as {delivery.DJANGO_DEFAULT_BACKEND!r}.",
                id="mailer.E007",
            )
        ]
    return []


def _check_queue_mailer(alias: str) -> list[CheckMessage]:
    """Make the ``DbBackend`` mailer ``alias`` as sending would, and report what it refuses."""
    from django.core.mail import mailers  # Django 6.1 and later: MAILERS is configured

    try:
        mailers[alias]
    except ConfigurationError as exc:
        return [_error(exc)]
    except ImproperlyConfigured as exc:  # Django's InvalidMailer: an option DbBackend does not take
        return [Error(str(exc), hint="A DbBackend mailer takes deliver_using and priority.", id="mailer.E006")]
    if delivery.mailer_options(alias).get("deliver_using"):
        return _as_messages(delivery.check_delivery_route, alias) or _check_delivering_mailer(alias)
    return []


def _check_delivering_mailer(alias: str | None = None) -> list[CheckMessage]:
    """Make the connection that delivers mail queued through ``alias`` (None: the default route), as a pass
    would: a misspelt ``BACKEND`` or an option it refuses would otherwise fail every pass.

    Making a connection connects to nothing.
    """
    try:
        delivery.get_delivery_connection(alias=alias)
    except ConfigurationError:
        return []  # the route's own checks say it
    except (ImportError, ImproperlyConfigured, TypeError, ValueError) as exc:
        route = delivery.delivery_route(alias)
        if isinstance(exc, ImportError) and route.alias is None:
            return []  # MAILER_EMAIL_BACKEND: mailer.E007 says it
        return [
            Error(
                f"{route.describe()}, which delivers queued mail, cannot be made: {type(exc).__name__}: {exc}",
                hint="Check its BACKEND and OPTIONS (or the EMAIL_* settings it reads).",
                id="mailer.E010",
            )
        ]
    return []


def _check_route(queues: list[str]) -> list[CheckMessage]:
    """Check the route of the default mailer's mail, and warn of a ``deliver_using`` it ignores."""
    problems = _as_messages(delivery.check_delivery_route) or _check_delivering_mailer()
    if conf.is_set("MAILER_EMAIL_BACKEND"):
        for alias in queues:
            if delivery.mailer_options(alias).get("deliver_using"):
                problems.append(
                    checks.Warning(
                        f"MAILERS[{alias!r}]: OPTIONS['deliver_using'] is ignored: MAILER_EMAIL_BACKEND is set, "
                        "and decides which backend delivers queued mail.",
                        hint="Remove MAILER_EMAIL_BACKEND (deliver_using replaces it with MAILERS).",
                        id="mailer.W001",
                    )
                )
    return problems


def _as_messages(check: Any, *args: Any) -> list[CheckMessage]:
    try:
        check(*args)
    except ConfigurationError as exc:
        return [_error(exc)]
    except ImportError:
        return []  # mailer.E007 says it
    return []


def _error(exc: ConfigurationError) -> Error:
    return Error(str(exc), hint=exc.hint, id=exc.check_id or "mailer.E000")
