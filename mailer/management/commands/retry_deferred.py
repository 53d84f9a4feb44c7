import logging
from typing import Any

from django.core.management.base import CommandParser
from django.utils.translation import gettext, gettext_lazy, ngettext

from mailer.management.commands._cron import add_cron_argument, warn_if_cron_given
from mailer.management.commands._output import errors_as_exit_status
from mailer.management.commands._translated import TranslatedCommand
from mailer.models import Message

logger = logging.getLogger(__name__)


class Command(TranslatedCommand):
    help = gettext_lazy("Attempt to resend any deferred mail.")

    def add_arguments(self, parser: CommandParser) -> None:
        add_cron_argument(parser)
        parser.add_argument(
            "--include-permanent",
            action="store_true",
            help=gettext(
                "Also requeue the messages the mail server refused for good (a 5xx reply), "
                "whatever MAILER_EMAIL_MAX_RETRIES says."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        warn_if_cron_given("retry_deferred", options, self.stderr)
        with errors_as_exit_status():
            count = Message.objects.retry_deferred()
            if options["include_permanent"]:
                count += Message.objects.requeue_failed()
        logger.info(gettext("%s message(s) retried"), count)
        if options["verbosity"] >= 1:
            self.stdout.write(
                ngettext("%(count)d message put back in the queue.", "%(count)d messages put back in the queue.", count)
                % {"count": count}
            )
