import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer.models import RESULT_DONT_SEND, RESULT_FAILURE, RESULT_SUCCESS, MessageLog

logger = logging.getLogger(__name__)

RESULT_CODES = {
    "success": [RESULT_SUCCESS],
    "failure": [RESULT_FAILURE],
    "all": [RESULT_SUCCESS, RESULT_DONT_SEND, RESULT_FAILURE],
}


class Command(BaseCommand):
    help = "Delete the mail log entries attempted more than DAYS days ago."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("days", type=int)
        parser.add_argument(
            "-r",
            "--result",
            choices=RESULT_CODES.keys(),
            default="success",
            help="Delete logs of messages with the given result (default: success)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        count = MessageLog.objects.purge_old_entries(options["days"], RESULT_CODES[options["result"]])
        logger.info("%s log entries deleted", count)
