"""The ``--connections`` option of the commands that send."""

import argparse

from django.utils.translation import gettext


def positive_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            # Translators: argparse puts "argument --connections: " before this; the value is shown quoted.
            gettext("must be a whole number, 1 or more, not %(value)s") % {"value": repr(text)}
        )
    return count


def add_connections_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections",
        type=positive_count,
        default=None,
        metavar="N",
        help=gettext("Send over N delivery connections at once (default: MAILER_DELIVERY_CONNECTIONS, 1)."),
    )
