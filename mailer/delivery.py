"""Which email backend really delivers the queued mail.

Everything that needs a delivering connection asks ``get_delivery_connection``,
so this module is the only place that knows about ``MAILER_EMAIL_BACKEND``,
Django 6.1's ``MAILERS`` and how they combine:

- Without ``MAILERS`` (Django 5.2 and 6.0, or 6.1 with the classic settings),
  the backend class named by ``MAILER_EMAIL_BACKEND`` delivers, as in
  django-mailer 2.x, configured by the ``EMAIL_*`` settings.
- With ``MAILERS``, and ``MAILER_EMAIL_BACKEND`` set, the mailer configured
  with that class delivers (so its ``OPTIONS`` apply); if no mailer uses that
  class, the class is created as it is (not Django's SMTP backend, which
  would need the ``EMAIL_*`` settings that ``MAILERS`` replaces).
- With ``MAILERS`` and no ``MAILER_EMAIL_BACKEND``, the default mailer
  delivers, unless it is the queue itself (``DbBackend``): then its
  ``deliver_using`` option names the mailer that delivers.

Every way this can be wrong is a ``ConfigurationError`` carrying the id of
the system check that reports it before anything runs (``mailer.checks``).
"""

import logging
from dataclasses import dataclass
from typing import Any

import django.core.mail
from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.utils.module_loading import import_string

from mailer import conf
from mailer.backend import DbBackend
from mailer.exceptions import ConfigurationError, InvalidDeliveryMailer
from mailer.smtp import EmailBackend as KeepingRefusalsBackend

logger = logging.getLogger(__name__)

DB_BACKEND = "mailer.backend.DbBackend"
DJANGO_DEFAULT_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
DEFAULT_MAILER = "default"


@dataclass(frozen=True)
class Route:
    """How queued mail leaves: through a ``MAILERS`` alias, or a backend class made directly."""

    backend_path: str
    alias: str | None = None

    def describe(self) -> str:
        if self.alias is None:
            return self.backend_path
        return f"MAILERS[{self.alias!r}] ({self.backend_path})"


def mailers_configured() -> bool:
    """Return whether the site uses Django 6.1's ``MAILERS`` setting."""
    return hasattr(settings, "MAILERS")


def django_has_mailers() -> bool:
    """Return whether this Django has ``MAILERS`` (6.1 and later), whether or not the site uses it."""
    return hasattr(django.core.mail, "mailers")


def mailer_options(alias: str) -> dict[str, Any]:
    """Return the ``OPTIONS`` of the ``MAILERS`` entry ``alias`` (which must exist)."""
    config: dict[str, Any] = settings.MAILERS[alias]
    options: dict[str, Any] = config.get("OPTIONS", {})
    return options


def backend_path(alias: str) -> str:
    """Return the ``BACKEND`` of the ``MAILERS`` entry ``alias`` (which must exist)."""
    return str(settings.MAILERS[alias].get("BACKEND", DJANGO_DEFAULT_BACKEND))


def is_queue(path: str) -> bool:
    """Return whether the backend class at ``path`` queues mail (``DbBackend`` or a subclass)."""
    if path == DB_BACKEND:
        return True
    try:
        backend_class = import_string(path)
    except ImportError:
        return False
    return isinstance(backend_class, type) and issubclass(backend_class, DbBackend)


def _is_django_smtp(path: str) -> bool:
    try:
        backend_class = import_string(path)
    except ImportError:
        return False
    return isinstance(backend_class, type) and issubclass(backend_class, DjangoSMTPBackend)


def routing_alias(alias: str | None) -> str | None:
    """Return the ``MAILERS`` entry whose route mail queued through ``alias`` takes; None: the default route.

    The mailer a message was queued through chooses its route only with
    ``MAILERS`` and without ``MAILER_EMAIL_BACKEND``, which, when set,
    delivers all queued mail (``deliver_using`` is then ignored, check
    ``mailer.W001``). Mail queued through the default mailer, before the
    alias was stored, or through a mailer since removed from ``MAILERS``
    (rather than waiting for ever), takes the default route.
    """
    if not alias or alias == DEFAULT_MAILER or not mailers_configured() or conf.is_set("MAILER_EMAIL_BACKEND"):
        return None
    if alias not in settings.MAILERS:
        logger.warning(
            "a message was queued through the mailer %r, which is no longer in MAILERS: it leaves the default way",
            alias,
        )
        return None
    return alias


def delivery_route(alias: str | None = None) -> Route:
    """Decide how queued mail is delivered, from the settings as they are now.

    ``alias`` is the ``MAILERS`` entry a message was queued through, for
    routing each message by its own mailer; None is the site's default
    route, which every message takes today.
    """
    if alias is not None:
        return _route_of_mailer(alias)
    if not mailers_configured():
        return Route(conf.get_setting("MAILER_EMAIL_BACKEND"))

    if conf.is_set("MAILER_EMAIL_BACKEND"):
        path = conf.get_setting("MAILER_EMAIL_BACKEND")
        for name in settings.MAILERS:
            if backend_path(name) == path:
                return Route(path, name)
        return Route(path)

    if DEFAULT_MAILER not in settings.MAILERS:
        raise InvalidDeliveryMailer(
            "MAILERS has no 'default' mailer, and MAILER_EMAIL_BACKEND is not set: nothing says how "
            "queued mail is delivered.",
            check_id="mailer.E001",
            hint="Add a 'default' mailer, or set MAILER_EMAIL_BACKEND.",
        )
    return _route_of_mailer(DEFAULT_MAILER)


def _route_of_mailer(alias: str) -> Route:
    """Return the route of mail queued through the ``MAILERS`` entry ``alias``.

    A delivering mailer delivers itself; a queue (``DbBackend``) hands its
    mail to the mailer its ``deliver_using`` option names, which must exist
    and deliver.
    """
    if not mailers_configured() or alias not in settings.MAILERS:
        raise InvalidDeliveryMailer(
            f"The mailer {alias!r} that should deliver queued mail is not in MAILERS.", check_id="mailer.E002"
        )
    path = backend_path(alias)
    if not is_queue(path):
        return Route(path, alias)
    target = mailer_options(alias).get("deliver_using")
    if not target and alias != DEFAULT_MAILER:
        return delivery_route()  # mail queued through another queue leaves as the default mailer's does
    if not target:
        raise InvalidDeliveryMailer(
            f"{DB_BACKEND} queues mail rather than delivering it: "
            "set its OPTIONS['deliver_using'] to the alias of the mailer that delivers queued mail.",
            alias=alias,
            check_id="mailer.E001",
            hint='For example "OPTIONS": {"deliver_using": "smtp"}, with an "smtp" mailer that delivers.',
        )
    if target not in settings.MAILERS:
        raise InvalidDeliveryMailer(
            f"The mailer {target!r} that should deliver queued mail is not in MAILERS.",
            alias=alias,
            check_id="mailer.E002",
            hint=f"OPTIONS['deliver_using'] must be one of: {', '.join(map(repr, settings.MAILERS))}.",
        )
    if is_queue(backend_path(target)):
        raise InvalidDeliveryMailer(
            f"OPTIONS['deliver_using'] names MAILERS[{target!r}], which queues mail again rather than delivering it.",
            alias=alias,
            check_id="mailer.E003",
            hint="Name a mailer whose BACKEND delivers mail, such as django.core.mail.backends.smtp.EmailBackend.",
        )
    return Route(backend_path(target), target)


def check_delivery_route(alias: str | None = None) -> Route:
    """Return the route, or raise ConfigurationError if queued mail could not be delivered that way."""
    route = delivery_route(alias)
    if is_queue(route.backend_path):
        if not mailers_configured():
            # Both settings are named without reading EMAIL_BACKEND, which
            # Django 6.1 deprecates: the loop is MAILER_EMAIL_BACKEND's.
            raise ConfigurationError(
                f'EMAIL_BACKEND and MAILER_EMAIL_BACKEND should not both be set to "{route.backend_path}" '
                "at the same time: MAILER_EMAIL_BACKEND must name the backend that really delivers mail.",
                check_id="mailer.E005",
                hint="Set MAILER_EMAIL_BACKEND to the backend that delivers, such as "
                f'"{DJANGO_DEFAULT_BACKEND}" (its default).',
            )
        raise ConfigurationError(
            f"Queued mail would be delivered by {route.describe()}, which queues it again. "
            "MAILER_EMAIL_BACKEND must name a backend that really delivers mail.",
            check_id="mailer.E005",
            hint="Remove MAILER_EMAIL_BACKEND and give the queue's mailer a deliver_using option.",
        )
    if route.alias is None and mailers_configured() and _is_django_smtp(route.backend_path):
        raise ConfigurationError(
            f"MAILER_EMAIL_BACKEND names {route.backend_path}, but no MAILERS entry uses it: it would need "
            "the EMAIL_* settings, which Django does not allow with MAILERS.",
            check_id="mailer.E008",
            hint='Add a MAILERS entry with that BACKEND and its "OPTIONS" (host, port, ...), '
            "or remove MAILER_EMAIL_BACKEND and use deliver_using.",
        )
    return route


def get_delivery_connection(message: object = None, *, alias: str | None = None) -> BaseEmailBackend:
    """Return a new, unopened connection of the backend that delivers ``message``.

    ``alias`` is the ``MAILERS`` entry the message was queued through; None
    (every message today) takes the site's default route. Routing each
    message by a mailer stored with it passes that mailer here.

    Where Django's SMTP backend delivers, its subclass in ``mailer.smtp``
    does, with the same options, so that refused recipients are logged.
    """
    route = check_delivery_route(alias)
    backend_class = import_string(route.backend_path)
    if backend_class is DjangoSMTPBackend:
        backend_class = KeepingRefusalsBackend
    smtp = isinstance(backend_class, type) and issubclass(backend_class, DjangoSMTPBackend)
    if route.alias is not None:
        if smtp:
            connection: BaseEmailBackend = backend_class(alias=route.alias, **mailer_options(route.alias))
            return connection
        from django.core.mail import mailers  # Django 6.1 and later; the route has an alias only there

        connection = mailers[route.alias]
        return connection
    if smtp and django_has_mailers():
        # The classic settings on Django 6.1: this backend is no MAILERS entry
        # (alias None), so it reads the EMAIL_* settings itself, as it does
        # for Django's own get_connection(), without the warning Django gives
        # code that makes backends instead of asking mail.mailers.
        connection = backend_class(alias=None)
        return connection
    connection = backend_class()
    return connection
