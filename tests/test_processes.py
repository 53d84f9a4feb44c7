"""The management commands as real processes, as cron runs them.

Each test has a database of its own on the vendor of the run (a SQLite
file, or a database on the PostgreSQL or MariaDB server), which the
processes and the test share; see ``tests/processes.py``.
"""

import re

import pytest

from tests.processes import manage

pytestmark = pytest.mark.slow


def queue_in_process(db, code: str):
    result = manage("shell", "-c", code, db=db)
    assert result.returncode == 0, result.stderr
    return result


def test_cron_send_mail_delivers_the_queue(process_db, smtp_server, tmp_path):
    queue_in_process(
        process_db,
        "import mailer; "
        "mailer.send_mail('Plain', 'Body', 'from@example.com', ['a@example.com']); "
        "mailer.send_html_mail('Html', 'Text', '<p>Html</p>', 'from@example.com', ['b@example.com'])",
    )
    assert smtp_server.received == []

    result = manage(
        "send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock")
    )

    assert result.returncode == 0, result.stderr
    assert sorted(r.message["Subject"] for r in smtp_server.received) == ["Html", "Plain"]
    assert "2 sent; 0 deferred" in result.stderr
    # The database the test shares with the processes says the same.
    assert process_db.query("SELECT COUNT(*) FROM mailer_message") == [(0,)]
    assert sorted(process_db.query("SELECT subject, result FROM mailer_messagelog")) == [("Html", "1"), ("Plain", "1")]


def test_the_processes_use_a_database_of_their_own_on_the_vendor_of_the_run(process_db):
    """On PostgreSQL and MariaDB runs the commands must run there too, not on a SQLite file."""
    from tests.processes import VENDOR

    result = queue_in_process(
        process_db,
        "from django.db import connection; print('database:', connection.vendor, connection.settings_dict['NAME'])",
    )

    assert re.findall(r"^database: (\S+) (\S+)$", result.stdout, re.MULTILINE) == [(VENDOR, process_db.name)]


def test_a_held_lock_makes_cron_send_mail_quit(process_db, smtp_server, tmp_path):
    import lockfile

    queue_in_process(process_db, "import mailer; mailer.send_mail('Held', 'Body', 'f@example.com', ['a@example.com'])")
    lock_path = str(tmp_path / "lock")
    held = lockfile.FileLock(lock_path)
    held.acquire()
    try:
        result = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=lock_path)
    finally:
        held.release()

    assert result.returncode == 0, result.stderr
    assert "lock already in place. quitting." in result.stderr
    assert smtp_server.received == []

    result = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=lock_path)
    assert [r.message["Subject"] for r in smtp_server.received] == ["Held"]


def test_runmailer_keeps_sending_what_is_queued_later(process_db, smtp_server, tmp_path):
    """runmailer, a real long-running process, delivers mail queued while it runs, then is stopped."""
    import signal
    import subprocess
    import sys
    import time

    from tests.processes import MANAGE_PY, process_environment

    env = process_environment(
        process_db,
        smtp_server.port,
        MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
        MAILER_PROCESS_EMPTY_QUEUE_SLEEP="0.2",
    )
    runner = subprocess.Popen(
        [sys.executable, str(MANAGE_PY), "runmailer"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for n in range(2):
            queue_in_process(
                process_db, f"import mailer; mailer.send_mail('Later {n}', 'B', 'f@example.com', ['a@example.com'])"
            )
            deadline = time.monotonic() + 20
            while len(smtp_server.received) <= n and time.monotonic() < deadline:
                time.sleep(0.1)
        assert sorted(r.message["Subject"] for r in smtp_server.received) == ["Later 0", "Later 1"]
    finally:
        runner.send_signal(signal.SIGINT)
        out, err = runner.communicate(timeout=20)
    assert "Starting django-mailer send loop." in out
    assert "Stopped." in out and "Traceback" not in err


def test_concurrent_workers_without_the_lock_send_each_message_exactly_once(process_db, smtp_server):
    """Claims, not the lock file, keep two workers from sending the same message."""
    import subprocess
    import sys

    from tests.processes import MANAGE_PY, process_environment

    queue_in_process(
        process_db,
        "import mailer\n"
        "for n in range(30): mailer.send_mail(f'Message {n}', 'B', 'f@example.com', [f'to{n}@example.com'])",
    )
    # The throttle makes each pass long enough for the three to overlap.
    env = process_environment(
        process_db, smtp_server.port, MAILER_PROCESS_USE_FILE_LOCK="0", MAILER_PROCESS_THROTTLE="0.05"
    )
    workers = [
        subprocess.Popen([sys.executable, str(MANAGE_PY), "send_mail"], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [worker.communicate(timeout=60)[1] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0, 0], errors
    subjects = [r.message["Subject"] for r in smtp_server.received]
    assert sorted(subjects) == sorted(f"Message {n}" for n in range(30))
    sent_per_worker = [sent_count(err) for err in errors]
    assert sum(sent_per_worker) == 30
    assert sum(1 for sent in sent_per_worker if sent) >= 2, f"the workers did not overlap: {sent_per_worker}"


def test_migrating_back_to_django_mailer_restores_pickles(process_db):
    """``migrate mailer 0007`` leaves rows django-mailer 2.x can read again: base64 pickles."""
    import base64
    import pickle

    queue_in_process(
        process_db,
        "import mailer\n"
        "from django.core.mail import EmailMultiAlternatives\n"
        "from email.mime.image import MIMEImage\n"
        "email = EmailMultiAlternatives('Going back', 'Text', 'f@example.com', ['a@example.com'])\n"
        "email.attach_alternative('<p>Html <img src=cid:logo></p>', 'text/html')\n"
        "image = MIMEImage(b'GIF89a-not-really', 'gif')\n"
        "image.add_header('Content-ID', '<logo>')\n"
        "email.attachments.append(image)\n"
        "mailer.models.Message.for_email(email).save()",
    )
    result = manage("migrate", "mailer", "0007", "-v", "0", db=process_db)
    assert result.returncode == 0, result.stderr

    [(data,)] = stored_message_data(process_db)
    raw = base64.decodebytes(data.encode("ascii"))
    assert b"mailer" not in raw  # django-mailer must find every class it names
    email = pickle.loads(raw)  # what django-mailer does
    assert (email.subject, email.alternatives[0][1]) == ("Going back", "text/html")
    [image] = email.attachments
    assert (type(image).__name__, image["Content-ID"], image.get_payload(decode=True)) == (
        "MIMEBase",
        "<logo>",
        b"GIF89a-not-really",
    )

    result = manage("migrate", "-v", "0", db=process_db)
    assert result.returncode == 0, result.stderr
    [(data,)] = stored_message_data(process_db)
    assert data.startswith("{")


def sent_count(stderr: str) -> int:
    """How many messages a ``send_mail`` process says it sent."""
    found = re.search(r"(\d+) sent;", stderr)
    assert found, stderr
    return int(found.group(1))


def stored_message_data(db):
    return db.query("SELECT message_data FROM mailer_message")


def test_processes_import_the_same_mailer_as_the_tests(tmp_path):
    """Under tox both import the installed wheel's mailer, never the checkout's (see tox.ini)."""
    from pathlib import Path

    import mailer

    result = manage("shell", "-c", "import mailer; print('mailer at', mailer.__file__)", db=tmp_path / "site.sqlite3")

    assert result.returncode == 0, result.stderr
    found = re.search(r"^mailer at (.+)$", result.stdout, re.MULTILINE)
    assert found, result.stdout
    assert Path(found.group(1)).resolve() == Path(mailer.__file__).resolve()
