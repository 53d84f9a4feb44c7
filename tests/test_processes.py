"""The management commands as real processes, as cron runs them."""

import re

import pytest

from tests.processes import manage


@pytest.fixture
def process_db(tmp_path):
    db = tmp_path / "site.sqlite3"
    result = manage("migrate", "-v", "0", db=db)
    assert result.returncode == 0, result.stderr
    return db


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
    sent_per_worker = [int(re.search(r"(\d+) sent;", err).group(1)) for err in errors]
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


def stored_message_data(db):
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db)) as connection:
        return connection.execute("SELECT message_data FROM mailer_message").fetchall()
