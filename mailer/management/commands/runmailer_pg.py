from typing import Any

from django.core.management.base import CommandError
from django.utils.translation import gettext_lazy

from mailer import postgres
from mailer.exceptions import ConfigurationError
from mailer.management.commands import runmailer


class Command(runmailer.Command):
    help = gettext_lazy(
        "Send queued mail as soon as it is queued (PostgreSQL LISTEN/NOTIFY), "
        "and look at the queue every MAILER_EMPTY_QUEUE_SLEEP seconds."
    )

    debug_loggers = ("mailer.engine", "mailer.postgres")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            postgres.check_database()  # before the banner: on another database no loop starts
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        super().handle(*args, **options)

    def send_loop(self, connections: int | None) -> None:
        postgres.postgres_send_loop(connections=connections)
