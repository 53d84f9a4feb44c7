import contextlib
import sys
from datetime import datetime
from typing import Any

from django.core.management.base import CommandParser
from django.utils.translation import gettext, gettext_lazy

from mailer import engine
from mailer.management.commands._connections import add_connections_argument
from mailer.management.commands._output import PassReport, debug_log_shown
from mailer.management.commands._translated import TranslatedCommand
from mailer.reporting import observing
from mailer.stopping import stopping_on_signals


class Command(TranslatedCommand):
    help = gettext_lazy("Send queued mail continuously, checking the queue every MAILER_EMPTY_QUEUE_SLEEP seconds.")

    # The loggers that --debug turns to DEBUG.
    debug_loggers: tuple[str, ...] = ("mailer.engine",)

    def add_arguments(self, parser: CommandParser) -> None:
        *others, last = self.debug_loggers
        if others:
            debug_help = gettext("Log %(loggers)s and %(last)s at DEBUG level") % {
                "loggers": ", ".join(others),
                "last": last,
            }
        else:
            debug_help = gettext("Log %(logger)s at DEBUG level") % {"logger": last}
        parser.add_argument("--debug", action="store_true", help=debug_help)
        add_connections_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]
        if options["debug"]:
            debug_loggers = self.debug_loggers
        elif verbosity >= 3:
            debug_loggers = ("mailer",)
        else:
            debug_loggers = ()
        if verbosity >= 1:  # -v 0: errors only
            self.stdout.write(datetime.now().strftime("%B %d, %Y - %X"))
            self.stdout.write(gettext("Starting django-mailer send loop."))
            quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
            self.stdout.write(gettext("Quit the loop with %(quit_command)s.") % {"quit_command": quit_command})
            self.stdout.flush()  # a pipe or a journal block-buffers it: the banner is seen when the loop starts
        # A pass that fails is printed, and the loop goes on (the engine logs it and sleeps).
        report = PassReport(self.stdout, self.stderr, verbosity, failures_printed=True)
        # SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the loop after the message in
        # flight; a second one ends it at once.
        with (
            observing(report),
            debug_log_shown(self.stderr, debug_loggers, verbosity),
            stopping_on_signals(),
            contextlib.suppress(KeyboardInterrupt),
        ):
            self.send_loop(options["connections"])
        if verbosity >= 1:
            self.stdout.write(gettext("Stopped."))

    def send_loop(self, connections: int | None) -> None:
        engine.send_loop(connections=connections)
