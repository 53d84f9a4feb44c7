"""The ``-c/--cron`` option that django-mailer's commands still accept."""

import warnings
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import OutputWrapper
from django.utils.translation import gettext


def add_cron_argument(parser: ArgumentParser) -> None:
    parser.add_argument("-c", "--cron", default=0, type=int, help=gettext("Deprecated; has no effect."))


def warn_if_cron_given(command_name: str, options: dict[str, Any], stderr: OutputWrapper | None = None) -> None:
    """Say on ``stderr`` that -c/--cron is deprecated, where a person sees it, and as a DeprecationWarning.

    Python hides a DeprecationWarning raised outside ``__main__``: nobody
    would learn that a crontab needs changing.
    """
    if not options["cron"]:
        return
    if stderr is not None:
        stderr.write(
            gettext("Warning: %(command)s's -c/--cron option is deprecated and has no effect; remove it.")
            % {"command": command_name}
        )
    warnings.warn(
        f"{command_name}'s -c/--cron option is no longer necessary and will be removed in a future release",
        DeprecationWarning,
        stacklevel=2,
    )
