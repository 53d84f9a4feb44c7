import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer import engine
from mailer.management.commands._connections import add_connections_argument
from mailer.management.commands._cron import add_cron_argument, warn_if_cron_given
from mailer.stopping import stopping_on_signals

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Do one pass through the mail queue, attempting to send all mail."

    def add_arguments(self, parser: CommandParser) -> None:
        add_cron_argument(parser)
        add_connections_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        warn_if_cron_given("send_mail", options)
        logger.info("-" * 72)
        # SIGTERM, SIGINT and SIGHUP end the pass after the message in flight,
        # which is recorded; the lock is released and the command exits 0.
        with stopping_on_signals():
            if options["connections"] is None:
                engine.send_all()  # as django-mailer called it: code written for it may patch it
            else:
                engine.send_all(connections=options["connections"])
