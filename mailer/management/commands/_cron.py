"""The ``-c/--cron`` option that django-mailer's commands still accept."""

import warnings
from argparse import ArgumentParser
from typing import Any


def add_cron_argument(parser: ArgumentParser) -> None:
    parser.add_argument("-c", "--cron", default=0, type=int, help="Deprecated; has no effect.")


def warn_if_cron_given(command_name: str, options: dict[str, Any]) -> None:
    if options["cron"]:
        warnings.warn(
            f"{command_name}'s -c/--cron option is no longer necessary and will be removed in a future release",
            DeprecationWarning,
            stacklevel=2,
        )
