"""Upgrading a real django-mailer 2.3.2 site: its database migrates and its queue still sends.

The database is made by django-mailer 2.3.2 itself (installed from PyPI in a
cached virtualenv, see ``tests/legacy/venv.py``), through its own migrations
and its own queueing API (``tests/legacy/build_legacy_db.py``). None of it
is written by this project's code, so the test catches any difference in
table layout, migration names or message encoding that a hand-made fixture
would share with the code under test.

It is made on the vendor of the run: a SQLite file, or a database of its own
on the PostgreSQL or MariaDB server (the legacy virtualenv then holds that
vendor's driver). Each test works on a copy of it. This project then runs on
the copy as real ``manage.py`` processes, as a site does after swapping the
package: ``migrate``, ``send_mail``, ``retry_deferred``, ``send_mail``,
delivering to a real SMTP server.

Building the virtualenv needs PyPI. If pip cannot reach it, the tests skip
on a developer's machine, and fail when ``CI`` or ``MAILER_TEST_REQUIRE_DB=1``
says the run must be complete. Any other failure to build it fails.
"""

import base64
import json
import pickle
import re
from pathlib import Path

import pytest

from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    MessageLog,
)
from tests.legacy.venv import LegacyVenvUnavailable, ensure_legacy_venv, run_legacy, run_must_be_complete
from tests.processes import VENDOR, ProcessDatabase, manage
from tests.test_migrations import DJANGO_MAILER_MIGRATIONS
from tests.test_storage_security import exec_writing

pytestmark = pytest.mark.slow

BUILD_SCRIPT = Path(__file__).parent / "legacy" / "build_legacy_db.py"

# The migrations django-mailer 2.3.2 ships, which a database it built has applied.
LEGACY_MIGRATIONS = DJANGO_MAILER_MIGRATIONS
OUR_MIGRATIONS = [
    "0008_message_claim",
    "0009_search_columns",
    "0010_convert_pickled_message_data",
    "0011_retry_after_failed_permanently",
    "0012_sending_order_and_purge_indexes",
    "0013_subject_copy",
    "0014_message_mailer_alias",
    "0015_dont_send_case_insensitive",
    "0016_search_columns_database_default",
    "0017_message_id_indexes",
    "0018_claims_index_of_claimed_messages_only",
]


@pytest.fixture(scope="module")
def legacy_python():
    """The python of the cached django-mailer 2.3.2 virtualenv for this run's vendor (built on first use)."""
    try:
        python, _info = ensure_legacy_venv(VENDOR)
    except LegacyVenvUnavailable as exc:
        message = f"cannot build the django-mailer 2.3.2 virtualenv for {VENDOR}: {exc}"
        if exc.index_problem is None:
            pytest.fail(f"{message}\n(pip reaches the package index: this is not a network problem)", pytrace=False)
        if run_must_be_complete():
            pytest.fail(
                f"{message}\n{exc.index_problem}\n(CI or MAILER_TEST_REQUIRE_DB=1: this must not be skipped)",
                pytrace=False,
            )
        pytest.skip(f"PyPI is unreachable, so django-mailer 2.3.2 cannot be installed: {exc.index_problem}")
    return python


@pytest.fixture(scope="module")
def legacy_site(legacy_python, tmp_path_factory):
    """A database made by django-mailer 2.3.2 on this run's vendor, and the manifest of what it queued.

    Built once per module; each test works on its own copy (``legacy_db``).
    A failure here is never a skip: the venv works, so the fault is ours.
    """
    workdir = tmp_path_factory.mktemp("legacy-site")
    db = ProcessDatabase.create(workdir, "legacy")
    try:
        result = run_legacy(
            legacy_python,
            BUILD_SCRIPT,
            str(workdir / "send_mail"),
            cwd=workdir,
            env={"MAILER_LEGACY_DATABASE": json.dumps(db.settings)},
        )
        assert result.returncode == 0, f"build_legacy_db.py failed:\n{result.stderr}"
        manifest = json.loads(result.stdout)
        assert manifest["mailer_version"] == "2.3.2"
        assert manifest["django_version"].startswith(("4.2", "5.0"))
        assert manifest["database_vendor"] == VENDOR
        yield db, manifest
    finally:
        db.drop()


@pytest.fixture
def legacy_db(legacy_site, tmp_path):
    """A fresh copy of the legacy database for one test."""
    source, _manifest = legacy_site
    db = source.copy(tmp_path, "site")
    yield db
    db.drop()


@pytest.fixture
def manifest(legacy_site):
    return legacy_site[1]


def query(db: ProcessDatabase, sql: str, *params) -> list[tuple]:
    """Read the database directly, as an operator would (``%s`` placeholders on every vendor)."""
    return db.query(sql, *params)


def mailer_migrations(db: ProcessDatabase) -> dict[str, bool]:
    """``showmigrations mailer`` as {name: applied}, from this project's point of view."""
    result = manage("showmigrations", "mailer", db=db)
    assert result.returncode == 0, result.stderr
    return {name: mark == "X" for mark, name in re.findall(r"\[( |X)\] (\S+)", result.stdout)}


def migrate(db: ProcessDatabase) -> None:
    result = manage("migrate", "--no-input", db=db)
    assert result.returncode == 0, f"migrate failed on the django-mailer 2.3.2 database:\n{result.stderr}"


def send_mail(db: ProcessDatabase, smtp_server, tmp_path: Path) -> str:
    result = manage(
        "send_mail", db=db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(tmp_path / "send_mail")
    )
    assert result.returncode == 0, f"send_mail failed on the queue of django-mailer 2.3.2:\n{result.stderr}"
    return result.stderr


def same_text(part, queued: str) -> bool:
    """Tell whether a received text part holds the text that was queued.

    Two differences are transport, not damage: SMTP carries lines ending in
    CRLF, and a MIME text part always ends with a line break.
    """
    received = part.get_content().replace("\r\n", "\n")
    return received.removesuffix("\n") == queued.removesuffix("\n")


def assert_arrived_intact(received, expected: dict) -> None:
    """Compare one message received by the SMTP server with what django-mailer 2.3.2 queued."""
    message = received.message
    key = expected["key"]
    assert message["Subject"] == expected["subject"], key
    assert str(message["From"]) == expected["from_email"], key
    assert [a.addr_spec for a in message["To"].addresses] == expected["to"], key
    if "cc" in expected:
        assert [a.addr_spec for a in message["Cc"].addresses] == expected["cc"], key
    assert message["Bcc"] is None, key
    assert message["Message-ID"], key
    assert received.mail_from == expected["envelope_from"], key
    assert sorted(received.rcpt_tos) == sorted(expected["rcpt"]), key

    assert same_text(message.get_body(preferencelist=("plain",)), expected["body"]), key
    if "html" in expected:
        html = message.get_body(preferencelist=("html",))
        assert html is not None and html.get_content_type() == "text/html", key
        assert same_text(html, expected["html"]), key
    else:
        assert message.get_body(preferencelist=("html",)) is None, key
    for name, value in expected.get("headers", {}).items():
        assert message[name] == value, key

    attachments = [
        (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
        for part in message.iter_attachments()
    ]
    wanted = [
        (a["filename"], a["mimetype"], base64.b64decode(a["content_b64"])) for a in expected.get("attachments", [])
    ]
    # Text travels with CRLF line endings, as SMTP requires; binary content
    # travels base64-encoded and must come back byte for byte.
    attachments = [
        (name, ctype, data.replace(b"\r\n", b"\n") if ctype.startswith("text/") else data)
        for name, ctype, data in attachments
    ]
    assert attachments == wanted, key


def test_database_of_django_mailer_2_3_2_is_recognised_and_migrates(legacy_db):
    """Its 0001..0007 count as applied with our migration files; only ours (0008 on) run, and succeed."""
    before = mailer_migrations(legacy_db)
    assert before == {**dict.fromkeys(LEGACY_MIGRATIONS, True), **dict.fromkeys(OUR_MIGRATIONS, False)}

    migrate(legacy_db)

    after = mailer_migrations(legacy_db)
    assert after == dict.fromkeys(LEGACY_MIGRATIONS + OUR_MIGRATIONS, True)
    assert {"message_data", "when_added", "priority", "retry_count", "claimed_by", "claimed_until"} <= (
        legacy_db.columns("mailer_message")
    )


def test_pickled_rows_are_converted_to_json_once_and_made_searchable(legacy_db, manifest):
    """After migrate no row holds a pickle any more, and subject, sender and recipients are columns."""
    migrate(legacy_db)

    for table in ("mailer_message", "mailer_messagelog"):
        for (data,) in query(legacy_db, f"SELECT message_data FROM {table} WHERE message_data IS NOT NULL"):
            assert json.loads(data)["mailer"] == 1, table
    subjects = {row[0] for row in query(legacy_db, "SELECT subject FROM mailer_message")}
    assert subjects == {m["subject"] for m in manifest["messages"]}
    recipients = [row[0] for row in query(legacy_db, "SELECT recipients FROM mailer_message WHERE recipients != ''")]
    assert len(recipients) == len(manifest["messages"])


def test_queue_of_django_mailer_2_3_2_sends_intact_after_the_upgrade(legacy_db, manifest, smtp_server, tmp_path):
    """Every message the old package queued reaches the mail server as it was queued, in priority order.

    The deferred one waits for ``retry_deferred``; afterwards the queue is
    empty and each message has its success row in the log.
    """
    expected = {m["key"]: m for m in manifest["messages"]}
    assert set(expected) == {"plain", "html", "attachments", "filtered", "django", "low", "deferred", "high"}
    migrate(legacy_db)

    send_mail(legacy_db, smtp_server, tmp_path)

    # Priority first, then the order of queueing (the manifest's order).
    ready = [m for m in manifest["messages"] if m["priority"] != PRIORITY_DEFERRED]
    first_pass = sorted(ready, key=lambda m: m["priority"])
    assert [r.message["Subject"] for r in smtp_server.received] == [m["subject"] for m in first_pass]
    assert smtp_server.received[0].message["Subject"] == expected["high"]["subject"]
    for received, wanted in zip(smtp_server.received, first_pass, strict=False):
        assert_arrived_intact(received, wanted)
    assert query(legacy_db, "SELECT priority, retry_count FROM mailer_message") == [(PRIORITY_DEFERRED, 0)]

    result = manage("retry_deferred", db=legacy_db)
    assert result.returncode == 0, result.stderr
    assert query(legacy_db, "SELECT priority, retry_count FROM mailer_message") == [(PRIORITY_MEDIUM, 1)]

    send_mail(legacy_db, smtp_server, tmp_path)

    assert len(smtp_server.received) == len(manifest["messages"])
    assert_arrived_intact(smtp_server.received[-1], expected["deferred"])
    assert query(legacy_db, "SELECT COUNT(*) FROM mailer_message") == [(0,)]

    # One success row per message, readable by our model, naming the Message-ID that went out.
    message_ids = {r.message["Subject"]: r.message["Message-ID"] for r in smtp_server.received}
    rows = query(
        legacy_db,
        "SELECT message_data, message_id FROM mailer_messagelog WHERE result = %s AND id > %s",
        RESULT_SUCCESS,
        manifest["sent_before"]["log_id"],
    )
    logged = {MessageLog(message_data=data).email.subject: message_id for data, message_id in rows}
    assert sorted(logged) == sorted(message_ids)
    wrong = {subject: (logged[subject], sent) for subject, sent in message_ids.items() if logged[subject] != sent}
    assert not wrong, f"success rows whose message_id is not the Message-ID that went out (logged, sent): {wrong}"


def test_log_of_django_mailer_2_3_2_stays_readable(legacy_db, manifest):
    """The success and failure rows the old package wrote survive the upgrade and decode with our model."""
    migrate(legacy_db)

    rows = query(
        legacy_db,
        "SELECT id, result, message_data, message_id, log_message, subject FROM mailer_messagelog ORDER BY id",
    )
    by_result: dict[str, list[tuple]] = {}
    for log_id, result, data, message_id, log_message, subject in rows:
        # The subject column is filled by the migration that converts the pickles.
        log = MessageLog(message_data=data, subject_copy=subject)
        by_result.setdefault(result, []).append((log_id, log, message_id, log_message))

    [(log_id, sent, message_id, _)] = by_result[RESULT_SUCCESS]
    assert log_id == manifest["sent_before"]["log_id"]
    assert sent.subject_copy == sent.subject == manifest["sent_before"]["subject"]
    assert message_id == manifest["sent_before"]["message_id"]
    assert sent.email.extra_headers["Message-ID"] == message_id

    [(_, failed, _, log_message)] = by_result[RESULT_FAILURE]
    deferred = next(m for m in manifest["messages"] if m["key"] == "deferred")
    assert failed.subject_copy == failed.subject == deferred["subject"]
    assert failed.to_addresses == deferred["to"]
    assert log_message == "421 4.3.0 try again later"


def test_dont_send_list_of_django_mailer_2_3_2_still_applies(legacy_db, manifest, smtp_server, tmp_path):
    """An address the old package put on the don't-send list receives nothing from the upgraded site."""
    migrate(legacy_db)
    [blocked] = manifest["dont_send"]
    assert query(legacy_db, "SELECT to_address FROM mailer_dontsendentry") == [(blocked,)]
    result = manage("shell", "-c", "from mailer.models import Message; Message.objects.all().delete()", db=legacy_db)
    assert result.returncode == 0, result.stderr

    result = manage(
        "shell",
        "-c",
        f"import mailer; mailer.send_mail('After the upgrade', 'Body', 'site@example.com', [{blocked.upper()!r}])",
        db=legacy_db,
    )
    assert result.returncode == 0, result.stderr
    send_mail(legacy_db, smtp_server, tmp_path)

    assert smtp_server.received == []
    assert query(legacy_db, "SELECT COUNT(*) FROM mailer_message") == [(0,)]
    assert query(legacy_db, "SELECT COUNT(*) FROM mailer_messagelog WHERE result = %s", RESULT_DONT_SEND) == [(1,)]


def test_a_forged_row_in_the_old_queue_runs_nothing_and_is_set_aside(legacy_db, manifest, smtp_server, tmp_path):
    """A pickle that runs code, written into django-mailer's queue before the upgrade, is never run.

    ``migrate`` converts the genuine rows and leaves the forged one exactly
    as it was; ``send_mail`` then defers it, with a failure log row that
    names what it asked for, and delivers the rest. The payload would create
    a marker file: its absence, checked after each process, is the proof.
    """
    marker = tmp_path / "pwned"
    forged = base64.encodebytes(pickle.dumps(exec_writing(marker))).decode("ascii")
    legacy_db.execute(
        "INSERT INTO mailer_message (message_data, when_added, priority, retry_count) VALUES (%s, %s, %s, %s)",
        forged,
        "2024-01-01 00:00:00",
        PRIORITY_HIGH,
        0,
    )
    [(forged_id,)] = query(legacy_db, "SELECT id FROM mailer_message WHERE message_data = %s", forged)

    migrate(legacy_db)

    assert not marker.exists(), "migrate ran the forged row"
    rows = dict(query(legacy_db, "SELECT id, message_data FROM mailer_message"))
    assert rows.pop(forged_id) == forged
    assert len(rows) == len(manifest["messages"])
    assert all(json.loads(data)["mailer"] == 1 for data in rows.values()), "the genuine rows were not converted"
    [(last_log_id,)] = query(legacy_db, "SELECT MAX(id) FROM mailer_messagelog")

    send_mail(legacy_db, smtp_server, tmp_path)

    assert not marker.exists(), "send_mail ran the forged row"
    assert query(legacy_db, "SELECT message_data, priority FROM mailer_message WHERE id = %s", forged_id) == [
        (forged, PRIORITY_DEFERRED)
    ]
    ready = [m for m in manifest["messages"] if m["priority"] != PRIORITY_DEFERRED]
    assert sorted(r.message["Subject"] for r in smtp_server.received) == sorted(m["subject"] for m in ready)
    failures = query(
        legacy_db,
        "SELECT log_message FROM mailer_messagelog WHERE result = %s AND id > %s",
        RESULT_FAILURE,
        last_log_id,
    )
    assert [log_message for (log_message,) in failures] == ["legacy pickle refused: it asks for builtins.exec"]
