import contextlib
import logging
import sys
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer import engine
from mailer.management.commands._connections import add_connections_argument
from mailer.stopping import stopping_on_signals


class Command(BaseCommand):
    help = "Send queued mail continuously, checking the queue every MAILER_EMPTY_QUEUE_SLEEP seconds."

    # The loggers that --debug turns to DEBUG.
    debug_loggers: tuple[str, ...] = ("mailer.engine",)

    def add_arguments(self, parser: CommandParser) -> None:
        loggers = " and ".join(self.debug_loggers)
        parser.add_argument("--debug", action="store_true", help=f"Log {loggers} at DEBUG level")
        add_connections_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["debug"]:
            for name in self.debug_loggers:
                logging.getLogger(name).setLevel(logging.DEBUG)
        self.stdout.write(datetime.now().strftime("%B %d, %Y - %X"))
        self.stdout.write("Starting django-mailer send loop.")
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        self.stdout.write(f"Quit the loop with {quit_command}.")
        # SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the loop after the message in
        # flight; a second one ends it at once.
        with stopping_on_signals(), contextlib.suppress(KeyboardInterrupt):
            self.send_loop(options["connections"])
        self.stdout.write("Stopped.")

    def send_loop(self, connections: int | None) -> None:
        engine.send_loop(connections=connections)
