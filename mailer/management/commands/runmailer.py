import logging
import sys
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer import engine


class Command(BaseCommand):
    help = "Send queued mail continuously, checking the queue every MAILER_EMPTY_QUEUE_SLEEP seconds."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--debug", action="store_true", help="Log mailer.engine at DEBUG level")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["debug"]:
            logging.getLogger("mailer.engine").setLevel(logging.DEBUG)
        self.stdout.write(datetime.now().strftime("%B %d, %Y - %X"))
        self.stdout.write("Starting django-mailer send loop.")
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        self.stdout.write(f"Quit the loop with {quit_command}.")
        try:
            engine.send_loop()
        except KeyboardInterrupt:
            self.stdout.write("Stopped.")
