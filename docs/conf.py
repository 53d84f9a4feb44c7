"""Sphinx configuration for mailer's documentation.

Plain Sphinx and intersphinx: the reference is written by hand, so building
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

extensions = ["sphinx.ext.intersphinx"]

# Links into Python's and Django's documentation (:class:`django.core.mail.EmailMessage`,
# :setting:`EMAIL_BACKEND`, :mod:`email.message`). Each inventory is fetched
# from the site first; offline (as in CI) the local copy that Debian's
# python3-doc and python-django-doc packages install is read instead (.ci/run
# installs them). A failed first try is only logged; when every try fails,
# sphinx-build -W fails. Debian's Django inventory is of an older Django, and
# of an html build: see _django_site_links below.
DJANGO_DOCS = "https://docs.djangoproject.com/en/5.2/"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", (None, "/usr/share/doc/python3/html/objects.inv")),
    "django": (
        DJANGO_DOCS,
        (f"{DJANGO_DOCS}_objects/", "/usr/share/doc/python-django-doc/html/objects.inv"),
    ),
}
intersphinx_timeout = 10

root_doc = "index"
exclude_patterns = ["_build"]
default_role = "literal"

html_theme = "alabaster"
html_title = f"mailer {release}"


def _django_site_links(app, doctree, docname):
    """Make links from an html build's inventory (page.html#anchor) fit Django's site (page/#anchor)."""
    from docutils import nodes

    for reference in doctree.findall(nodes.reference):
        uri = reference.get("refuri", "")
        if uri.startswith(DJANGO_DOCS):
            page, hash_, anchor = uri[len(DJANGO_DOCS) :].partition("#")
            page = re.sub(r"(^|/)index\.html$", r"\1", page)
            page = re.sub(r"\.html$", "/", page)
            reference["refuri"] = f"{DJANGO_DOCS}{page}{hash_}{anchor}"


def setup(app):
    app.connect("doctree-resolved", _django_site_links)
    # Targets for settings and management commands, so pages can link to
    # them with :setting:`NAME` and :djadmin:`name`.
    app.add_crossref_type("setting", "setting", indextemplate="pair: %s; setting")
    app.add_crossref_type("djadmin", "djadmin", indextemplate="pair: %s; management command")
