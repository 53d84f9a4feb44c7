import argparse
import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils.translation import gettext, gettext_lazy, ngettext

from mailer.management.commands._output import errors_as_exit_status
from mailer.management.commands._translated import TranslatedCommand
from mailer.models import RESULT_DONT_SEND, RESULT_FAILURE, RESULT_SUCCESS, MessageLog

logger = logging.getLogger(__name__)

RESULT_CODES = {
    "success": [RESULT_SUCCESS],
    "failure": [RESULT_FAILURE],
    "all": [RESULT_SUCCESS, RESULT_DONT_SEND, RESULT_FAILURE],
}


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            # Translators: argparse puts "argument DAYS: " before this; the value is shown quoted.
            gettext("must be a whole number of days, not %(value)s") % {"value": repr(text)}
        ) from None


class Command(TranslatedCommand):
    help = gettext_lazy("Delete the mail log entries attempted more than DAYS days ago.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "days",
            type=whole_number,
            metavar="DAYS",
            help=gettext("Delete the entries older than this many days (0: all of them)."),
        )
        parser.add_argument(
            "-r",
            "--result",
            choices=RESULT_CODES.keys(),
            default="success",
            help=gettext("Delete logs of messages with the given result (default: success)"),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"]
        if days < 0:
            # A negative age is in the future: every entry is older, and all of them would go.
            raise CommandError(
                gettext("DAYS must be 0 or more, not %(days)d: nothing deleted.") % {"days": days}, returncode=1
            )
        with errors_as_exit_status():
            count = MessageLog.objects.purge_old_entries(days, RESULT_CODES[options["result"]])
        logger.info(gettext("%s log entries deleted"), count)
        if options["verbosity"] >= 1:
            self.stdout.write(
                ngettext("%(count)d log entry deleted.", "%(count)d log entries deleted.", count) % {"count": count}
            )
