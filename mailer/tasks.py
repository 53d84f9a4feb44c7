"""Send the queue from a Tasks worker, as soon as the transaction that queued mail commits.

Optional: nothing here runs unless ``MAILER_TASK_BACKEND`` names a backend of
the ``TASKS`` setting. Then, whenever mail is queued, mailer enqueues the
``send_queued_mail`` task once the queueing transaction commits, and the
site's Tasks worker makes one pass over the queue (as ``manage.py send_mail``
would), so mail goes out within moments, without waiting for cron.

The Tasks framework is Django's ``django.tasks`` on Django 6.0 and later, or
the ``django-tasks`` backport on Django 5.2; this module imports without
either, so importing mailer never needs one. See ``docs/tasks.rst``.
"""

import logging
from collections.abc import Iterable
from importlib import import_module
from importlib.util import find_spec
from types import ModuleType
from typing import Any

from django.core import checks
from django.db import transaction

from mailer import conf
from mailer.exceptions import ConfigurationError

logger = logging.getLogger(__name__)

# Django's own framework first, as django-tasks-db does: on Django 6 a site
# that also has the backport installed configures Django's.
FRAMEWORKS = ("django.tasks", "django_tasks")


def send_queued_mail() -> dict[str, int] | None:
    """Make one pass over the queue, under the lock file; return its counts, or None if it did not run.

    It is ``mailer.engine.send_all``, as ``manage.py send_mail`` runs it: a
    pass does nothing while ``MAILER_PAUSE_SEND`` is on, and gives way when
    another pass (cron's, ``runmailer``'s, another task's) holds the lock,
    since that pass sends whatever is due. An error that ends the pass (the
    database is gone, the settings are wrong) is raised, so the Tasks backend
    records the task as failed; the mail stays queued.
    """
    from mailer.engine import send_all

    counts = send_all()
    return None if counts is None else dict(counts)


# The task is made when it is asked for, not at import: making a Task looks
# up its backend in TASKS, which would make importing this module fail on a
# site without a Tasks framework, or whose TASKS has no backend that takes
# mailer's task. A worker finds the task by the path of its function,
# ``mailer.tasks.send_queued_mail``, which __getattr__ answers with the Task.
_send_queued_mail = send_queued_mail
del send_queued_mail


def __getattr__(name: str) -> Any:
    if name == "send_queued_mail":
        return make_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_task() -> Any:
    """Return the ``send_queued_mail`` Task, for the backend and queue that mailer's settings name.

    Raise ``ConfigurationError`` when there is no Tasks framework, and the
    framework's own error when ``TASKS`` has no such backend or the backend
    does not take the task (a queue it does not serve).
    """
    alias = configured_backend() or "default"
    return framework().task(_send_queued_mail, backend=alias, queue_name=conf.get_setting("MAILER_TASK_QUEUE"))


def framework() -> ModuleType:
    """Return the Tasks framework: ``django.tasks`` (Django 6.0+), else the ``django_tasks`` backport."""
    for name in FRAMEWORKS:
        if find_spec(name) is not None:
            return import_module(name)
    raise ConfigurationError(
        "MAILER_TASK_BACKEND is set, but there is no Tasks framework to enqueue mailer's task with: "
        "it needs Django 6.0 or later (django.tasks), or on Django 5.2 the django-tasks package "
        "(pip install 'django-mailer-ng[tasks]')."
    )


def configured_backend() -> str | None:
    """Return the ``TASKS`` alias that ``MAILER_TASK_BACKEND`` names, or None when the queue is left to cron."""
    alias = conf.get_setting("MAILER_TASK_BACKEND")
    if alias is None:
        return None
    if not isinstance(alias, str) or not alias:
        raise ConfigurationError(
            f"MAILER_TASK_BACKEND must be None or the alias of a backend of the TASKS setting "
            f"(such as 'default'), not {alias!r}."
        )
    return alias


def on_mail_queued(sender: Any, using: str | None = None, **kwargs: Any) -> None:
    """Receiver of ``mailer.signals.mail_queued``, connected by ``MailerConfig.ready``: see ``drain_after_commit``.

    The queueing code reaches this module through the signal rather than an
    import, as this module imports the engine, which imports the queueing code.
    """
    drain_after_commit(using)


def drain_after_commit(using: str | None = None) -> None:
    """Have the queue sent by a Tasks worker once the transaction on database ``using`` that queued mail commits.

    ``using`` is the alias of the database the mail was stored in (None: ``default``).

    Mailer's queueing functions call this (through the ``mail_queued``
    signal) after they store mail. It does nothing unless ``MAILER_TASK_BACKEND`` is set. Outside a transaction
    the task is enqueued at once; inside one, when it commits, and not at
    all when it rolls back, so a worker never looks for mail that is not
    there yet, nor for mail that never will be. One transaction that queues
    many messages enqueues one task: a pass sends them all.

    Raise ``ConfigurationError`` (before anything is enqueued) when the
    setting is wrong or no Tasks framework is installed. A backend that
    fails to enqueue, after the commit, raises nothing: see ``enqueue_drain``.
    """
    if configured_backend() is None:
        return
    framework()
    connection = transaction.get_connection(using)
    if _enqueued_on_commit(connection):
        return
    transaction.on_commit(enqueue_drain, using=using)


def _enqueued_on_commit(connection: Any) -> bool:
    """Whether the current transaction already enqueues the task when it commits.

    A request made in a savepoint that was rolled back is gone from Django's
    list. One still there is kept whenever the mail queued now is: only an
    open savepoint could still drop it, and this mail is inside that one
    too. Django's list is
    not public: if its form ever changes, this answers False, and the worst
    outcome is a second task, whose pass finds nothing to send.
    """
    if not connection.in_atomic_block:
        return False
    try:
        return any(func is enqueue_drain for _sids, func, _robust in connection.run_on_commit)
    except (AttributeError, TypeError, ValueError):
        return False


def enqueue_drain() -> None:
    """Enqueue ``send_queued_mail`` on the backend ``MAILER_TASK_BACKEND`` names; log a failure, never raise it.

    It runs after the commit: the mail is queued whatever happens here, and
    the next pass (cron's ``send_mail``, ``runmailer``, the next task) sends
    it. So a backend that cannot be reached (its broker or database down,
    or wrongly configured) is logged as a warning and the web request that
    queued the mail carries on. With Django's ``ImmediateBackend`` the pass
    runs here, and the backend itself records an error of the pass.
    """
    try:
        make_task().enqueue()
    except Exception as exc:
        logger.warning(
            "could not enqueue mailer's send_queued_mail task on the Tasks backend %r (%s: %s); "
            "the mail stays queued for the next send_mail or runmailer pass",
            conf.get_setting("MAILER_TASK_BACKEND"),
            type(exc).__name__,
            exc,
            exc_info=True,
        )


def check_task_settings(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System check (``manage.py check``, every command's start): can the task be enqueued as configured?

    What ``drain_after_commit`` would find only when mail is queued, or
    ``enqueue_drain`` would log only after a commit, reported at start-up.
    """
    try:
        if configured_backend() is None:
            return []
        make_task()
    except Exception as exc:
        return [
            checks.Error(
                f"mailer cannot enqueue its send_queued_mail task: {exc}",
                hint="Fix MAILER_TASK_BACKEND, MAILER_TASK_QUEUE or TASKS (see mailer's docs, tasks.rst), "
                "or set MAILER_TASK_BACKEND = None to leave the queue to cron.",
                id="mailer.E009",
            )
        ]
    return []
