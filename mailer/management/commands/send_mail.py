import logging
from typing import Any

from django.core.management.base import CommandParser
from django.utils.translation import gettext_lazy

from mailer import engine
from mailer.management.commands._connections import add_connections_argument
from mailer.management.commands._cron import add_cron_argument, warn_if_cron_given
from mailer.management.commands._output import PassReport, debug_log_shown, errors_as_exit_status
from mailer.management.commands._translated import TranslatedCommand
from mailer.reporting import observing
from mailer.stopping import stopping_on_signals

logger = logging.getLogger(__name__)


class Command(TranslatedCommand):
    help = gettext_lazy("Do one pass through the mail queue, attempting to send all mail.")

    def add_arguments(self, parser: CommandParser) -> None:
        add_cron_argument(parser)
        add_connections_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        warn_if_cron_given("send_mail", options, self.stderr)
        logger.info("-" * 72)
        verbosity = options["verbosity"]
        # SIGTERM, SIGINT and SIGHUP end the pass after the message in flight,
        # which is recorded; the lock is released and the command exits 0.
        with (
            observing(PassReport(self.stdout, self.stderr, verbosity)),
            debug_log_shown(self.stderr, ("mailer",) if verbosity >= 3 else (), verbosity),
            errors_as_exit_status(),
            stopping_on_signals(),
        ):
            if options["connections"] is None:
                engine.send_all()  # as django-mailer called it: code written for it may patch it
            else:
                engine.send_all(connections=options["connections"])
