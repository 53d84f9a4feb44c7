"""The ``--connections`` option of the commands that send."""

import argparse


def positive_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, not {text!r}")
    return count


def add_connections_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections",
        type=positive_count,
        default=None,
        metavar="N",
        help="Send over N delivery connections at once (default: MAILER_DELIVERY_CONNECTIONS, 1).",
    )
