import contextlib
import logging
import sys
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from mailer import postgres
from mailer.exceptions import ConfigurationError
from mailer.management.commands._connections import add_connections_argument
from mailer.stopping import stopping_on_signals


class Command(BaseCommand):
    help = (
        "Send queued mail as soon as it is queued (PostgreSQL LISTEN/NOTIFY), "
        "and look at the queue every MAILER_EMPTY_QUEUE_SLEEP seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--debug", action="store_true", help="Log mailer.engine and mailer.postgres at DEBUG level")
        add_connections_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            postgres.check_database()  # before the banner: on another database no loop starts
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        if options["debug"]:
            for name in ("mailer.engine", "mailer.postgres"):
                logging.getLogger(name).setLevel(logging.DEBUG)
        self.stdout.write(datetime.now().strftime("%B %d, %Y - %X"))
        self.stdout.write("Starting django-mailer send loop.")
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        self.stdout.write(f"Quit the loop with {quit_command}.")
        # SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the loop after the message in
        # flight; a second one ends it at once.
        with stopping_on_signals(), contextlib.suppress(KeyboardInterrupt):
            postgres.postgres_send_loop(connections=options["connections"])
        self.stdout.write("Stopped.")
