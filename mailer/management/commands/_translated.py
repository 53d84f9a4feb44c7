"""The base of mailer's commands: help texts in the language of the site."""

from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandParser

if TYPE_CHECKING:
    from django.utils.functional import _StrOrPromise


class TranslatedCommand(BaseCommand):
    """A command whose ``help`` is marked with ``gettext_lazy``.

    The help is translated when it is shown, not when the module is
    imported; argparse formats only ``str``, so the parser gets it as one.
    """

    help: "_StrOrPromise"  # type: ignore[assignment]  # BaseCommand's stub says str; lazy text is handled below

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if parser.description is not None:
            parser.description = str(parser.description)
        return parser
