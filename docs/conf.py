"""Sphinx configuration for mailer's documentation.

Plain Sphinx, no extensions: the reference is written by hand, so building
the docs needs neither Django nor a settings module.
"""

import re
from pathlib import Path

_INIT = Path(__file__).resolve().parent.parent / "mailer" / "__init__.py"
_VERSION = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", _INIT.read_text(encoding="utf-8"), re.MULTILINE)
if _VERSION is None:
    raise RuntimeError(f"no __version__ found in {_INIT}")

project = "mailer"
author = "the mailer contributors"
copyright = "the mailer contributors"
release = _VERSION.group(1)
version = ".".join(release.split(".")[:2])

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
default_role = "literal"

html_theme = "alabaster"
html_title = f"mailer {release}"


def setup(app):
    # Targets for settings and management commands, so pages can link to
    # them with :setting:`NAME` and :djadmin:`name`.
    app.add_crossref_type("setting", "setting", indextemplate="pair: %s; setting")
    app.add_crossref_type("djadmin", "djadmin", indextemplate="pair: %s; management command")
