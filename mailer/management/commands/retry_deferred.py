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

    def handle(self, *args: Any, **options: Any) -> None:
        warn_if_cron_given("retry_deferred", options)
        count = Message.objects.retry_deferred()
        logger.info("%s message(s) retried", count)
