import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer.management.commands._cron import add_cron_argument, warn_if_cron_given
from mailer.models import Message

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Attempt to resend any deferred mail."

    def add_arguments(self, parser: CommandParser) -> None:
        add_cron_argument(parser)
        parser.add_argument(
            "--include-permanent",
            action="store_true",
            help="Also requeue the messages the mail server refused for good (a 5xx reply), "
            "whatever MAILER_EMAIL_MAX_RETRIES says.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        warn_if_cron_given("retry_deferred", options)
        count = Message.objects.retry_deferred()
        if options["include_permanent"]:
            count += Message.objects.requeue_failed()
        logger.info("%s message(s) retried", count)
