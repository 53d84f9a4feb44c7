"""mailer's translations: every string a user reads, in every language it ships, and used for real.

The catalogues are mailer/locale/<language>/LC_MESSAGES/django.po, compiled
to the django.mo next to each, which is what Django reads. A string marked
for translation in the code but missing from a catalogue shows in English
on a page that is otherwise translated; a .mo left behind by a change to
its .po ships the old text. So the tests:

- extract the strings the way the maintainers do (``makemessages``, run on
  a copy of the package these tests import: the installed one under tox)
  and require each in every catalogue, translated (not empty, not fuzzy,
  every plural form);
- compile each catalogue with ``msgfmt --check`` (which also checks that a
  translation keeps the ``%(name)s``/``%d`` placeholders of its original)
  and require the shipped .mo to hold exactly what it compiles to;
- read the strings back through Django in each language: a model's name,
  an admin action's message on the page that follows it, and the help of
  every management command.

They need GNU gettext's tools (the ``gettext`` package of Debian). Without
them the first two are skipped, or fail when ``CI`` is set, so that CI
cannot pass them by skipping.

Updating the catalogues after a change to the marked strings, from
mailer/: ``django-admin makemessages --all --no-obsolete --add-location
file``, translate what is new (empty or "fuzzy"), then ``django-admin
compilemessages``.
"""

import ast
import html
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.core.mail import EmailMessage
from django.core.management import get_commands, load_command_class
from django.urls import reverse
from django.utils import translation

import mailer
from mailer.models import DontSendEntry, Message, MessageLog

LANGUAGES = ["de", "es", "fr", "ja", "pt_BR", "ru", "zh_Hans"]

PACKAGE = Path(mailer.__file__).resolve().parent
LOCALE = PACKAGE / "locale"

# What makemessages and msgfmt run.
GETTEXT_TOOLS = ["xgettext", "msguniq", "msgmerge", "msgattrib", "msgfmt"]


# --------------------------------------------------------------------------
# Reading catalogues
# --------------------------------------------------------------------------


@dataclass
class Entry:
    """One message of a .po/.pot file."""

    msgid: str
    context: str | None = None
    plural: str | None = None
    translations: dict[int, str] = field(default_factory=dict)
    fuzzy: bool = False
    line: int = 0

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.context, self.msgid)


def read_po(path: Path) -> list[Entry]:
    """The messages of a .po or .pot file, header included (msgid ""); obsolete (#~) ones left out.

    Enough of the format for what makemessages writes: flags, msgctxt,
    msgid, msgid_plural, msgstr and msgstr[N], each possibly continued on
    the following lines.
    """
    entries: list[Entry] = []
    fields: dict[str, str] = {}
    flags: set[str] = set()
    current = ""
    start = 0

    def finish() -> None:
        if "msgid" in fields:
            entry = Entry(fields["msgid"], fields.get("msgctxt"), fields.get("msgid_plural"), line=start)
            entry.fuzzy = "fuzzy" in flags
            for name, value in fields.items():
                if name == "msgstr":
                    entry.translations[0] = value
                elif name.startswith("msgstr["):
                    entry.translations[int(name[7:-1])] = value
            entries.append(entry)
        fields.clear()
        flags.clear()

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:  # a blank line ends a message
            finish()
        elif line.startswith("#~"):
            continue
        elif line.startswith("#"):
            if "msgid" in fields:
                finish()
            if line.startswith("#,"):
                flags.update(flag.strip() for flag in line[2:].split(","))
        elif line.startswith('"'):
            fields[current] += ast.literal_eval(line)
        else:
            keyword, _, text = line.partition(" ")
            if keyword in ("msgctxt", "msgid") and "msgid" in fields:
                finish()
            if not fields:
                start = number
            current = keyword
            fields[keyword] = ast.literal_eval(text)
    finish()
    return entries


def header(entries: list[Entry]) -> dict[str, str]:
    """The fields of the catalogue's header (the translation of msgid "")."""
    (first,) = [e for e in entries if e.key == (None, "")]
    fields = {}
    for line in first.translations[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def plural_count(entries: list[Entry]) -> int:
    match = re.search(r"nplurals\s*=\s*(\d+)", header(entries)["Plural-Forms"])
    assert match, "no nplurals in Plural-Forms"
    return int(match.group(1))


def read_mo(path: Path) -> dict[bytes, bytes]:
    """The messages of a compiled .mo file: original (context\\x04msgid, plurals joined by NUL) to translation."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    _revision, count, originals, translations = struct.unpack(order + "4I", data[4:20])

    def string(table: int, index: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * index : table + 8 * index + 8])
        return data[offset : offset + length]

    return {string(originals, i): string(translations, i) for i in range(count)}


def catalogue(language: str) -> list[Entry]:
    return read_po(LOCALE / language / "LC_MESSAGES" / "django.po")


def translated(language: str, msgid: str) -> Entry:
    (entry,) = [e for e in catalogue(language) if e.key == (None, msgid)]
    return entry


# --------------------------------------------------------------------------
# The gettext tools
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gettext_tools() -> None:
    missing = [tool for tool in GETTEXT_TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"GNU gettext tools not found: {', '.join(missing)} (Debian: apt-get install gettext)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def extracted(gettext_tools: None, tmp_path_factory: pytest.TempPathFactory) -> list[Entry]:
    """The messages makemessages extracts from the package today (its .pot), header left out."""
    copy = tmp_path_factory.mktemp("extract") / "mailer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("locale", "__pycache__"))
    (copy / "locale").mkdir()
    # Run as the maintainers do, without settings; the package directory must not shadow
    # the modules Django imports, so it is taken off sys.path.
    code = (
        "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
        "from django.core.management import execute_from_command_line; execute_from_command_line(sys.argv)"
    )
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code, "makemessages", "--locale", "en", "--keep-pot", "--verbosity", "0"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    entries = [e for e in read_po(copy / "locale" / "django.pot") if e.msgid]
    assert len(entries) > 30, f"makemessages found only {len(entries)} strings: is the extraction broken?"
    return entries


# --------------------------------------------------------------------------
# (a) Every catalogue is complete
# --------------------------------------------------------------------------


def test_the_catalogues_are_the_languages_shipped():
    assert sorted(p.name for p in LOCALE.iterdir() if p.is_dir()) == sorted(LANGUAGES)
    for language in LANGUAGES:
        assert header(catalogue(language))["Language"] == language


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_string_marked_in_the_code_is_translated(extracted, language):
    """Each string makemessages finds is in the catalogue, translated in every plural form, not fuzzy."""
    entries = catalogue(language)
    forms = plural_count(entries)
    by_key = {e.key: e for e in entries}
    problems = []
    for wanted in extracted:
        found = by_key.get(wanted.key)
        if found is None:
            problems.append(f"missing: {wanted.msgid!r}")
            continue
        if found.fuzzy:
            problems.append(f"fuzzy (needs review), line {found.line}: {wanted.msgid!r}")
        if found.plural != wanted.plural:
            problems.append(f"plural {found.plural!r}, the code has {wanted.plural!r}: {wanted.msgid!r}")
        expected_forms = list(range(forms)) if wanted.plural is not None else [0]
        if sorted(found.translations) != expected_forms:
            problems.append(f"forms {sorted(found.translations)}, {expected_forms} wanted: {wanted.msgid!r}")
        if any(not text.strip() for text in found.translations.values()):
            problems.append(f"untranslated, line {found.line}: {wanted.msgid!r}")
    assert problems == [], f"{language}: {len(problems)} of {len(extracted)} strings:\n" + "\n".join(problems)


# --------------------------------------------------------------------------
# (b) Each catalogue compiles, and the shipped .mo is the compiled .po
# --------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_catalogue_compiles_and_the_shipped_mo_is_its_compiled_po(gettext_tools, tmp_path, language):
    """``msgfmt --check``: header, plural forms, and the python-format placeholders of each original kept."""
    directory = LOCALE / language / "LC_MESSAGES"
    compiled = tmp_path / "django.mo"
    result = subprocess.run(
        ["msgfmt", "--check", "-o", str(compiled), str(directory / "django.po")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (directory / "django.mo").is_file(), "no compiled django.mo: run compilemessages"
    shipped = read_mo(directory / "django.mo")
    fresh = read_mo(compiled)
    assert shipped.keys() == fresh.keys(), "django.mo is out of date: run compilemessages"
    stale = [key.decode() for key in fresh if shipped[key] != fresh[key]]
    assert stale == [], "django.mo is out of date (run compilemessages) for: " + ", ".join(stale)


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_translation_without_placeholders_brings_none(language):
    """A '%' in the translation of a plain string would break argparse (help) or a later % formatting."""
    bad = [
        e.msgid
        for e in catalogue(language)
        if e.msgid and "%" not in e.msgid and any("%" in text for text in e.translations.values())
    ]
    assert bad == []


# --------------------------------------------------------------------------
# (c) Django shows them
# --------------------------------------------------------------------------


# Words the same in English and in the language.
SAME_WORD = {("fr", "message"), ("fr", "messages")}


@pytest.mark.parametrize("language", LANGUAGES)
def test_model_names_come_out_translated(language):
    with translation.override(language):
        shown = {
            "message": str(Message._meta.verbose_name),
            "messages": str(Message._meta.verbose_name_plural),
            "don't send entry": str(DontSendEntry._meta.verbose_name),
            "message log": str(MessageLog._meta.verbose_name),
        }
    for english, text in shown.items():
        assert text == translated(language, english).translations[0]
        if (language, english) not in SAME_WORD:
            assert text != english, f"{english!r} is shown in English"


@pytest.mark.django_db
@pytest.mark.parametrize("language", LANGUAGES)
def test_an_admin_action_says_what_it_did_in_the_language_of_the_page(admin_client, language):
    message = Message.for_email(EmailMessage("Hello", "Body", "f@example.com", ["t@example.com"]))
    message.save()
    with translation.override(language):
        response = admin_client.post(
            reverse("admin:mailer_message_changelist"),
            {"action": "defer_messages", "_selected_action": [message.pk]},
            follow=True,
        )
    page = response.content.decode()
    items = re.findall(r'<li class="[^"]*\binfo\b[^"]*">(.*?)</li>', page, re.S)
    said = [html.unescape(text).strip() for text in items]
    # One message: the first plural form in each of these languages.
    expected = translated(language, "%d message deferred.").translations[0] % 1
    assert expected.strip() and expected != "1 message deferred."
    assert said == [expected]
    assert "1 message deferred." not in page


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize(
    "name",
    sorted(name for name, app in get_commands().items() if app == "mailer"),
)
def test_command_help_comes_out_translated(language, name):
    """``manage.py <command> --help`` in the site's language: the description translated, options' help formatted."""
    command = load_command_class("mailer", name)
    with translation.override(language):
        text = command.create_parser("manage.py", name).format_help()
    english_help = str(command.help)
    wanted = translated(language, english_help).translations[0]
    assert wanted.strip(), f"{name}'s help is not translated"
    assert " ".join(wanted.split()) in " ".join(text.split())
    assert " ".join(english_help.split()) not in " ".join(text.split())
