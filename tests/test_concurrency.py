"""Several workers on one queue, each with its own database connection."""

import threading

import pytest
from django.db import close_old_connections, connection

import mailer
from mailer import engine
from mailer.models import Message, MessageLog

MESSAGES = 40
WORKERS = 4


@pytest.mark.django_db(transaction=True)
def test_workers_without_the_lock_send_each_message_exactly_once(settings, deliver_to_smtp):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite allows one writer at a time; tests/test_processes.py races real processes on a file")
    settings.MAILER_USE_FILE_LOCK = False
    settings.MAILER_EMAIL_THROTTLE = 0.01  # long enough passes to overlap
    for n in range(MESSAGES):
        mailer.send_mail(f"Message {n}", "Body", "f@example.com", [f"to{n}@example.com"])

    errors = []
    sent = []
    start = threading.Barrier(WORKERS, timeout=30)

    def work():
        try:
            start.wait()
            counts = engine.send_all()
            assert counts is not None
            sent.append(counts["sent"])
        except Exception as exc:  # reported below, with the others
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker is still sending after 120 s"

    assert errors == []
    subjects = sorted(r.message["Subject"] for r in deliver_to_smtp.received)
    assert subjects == sorted(f"Message {n}" for n in range(MESSAGES))
    assert Message.objects.count() == 0
    assert MessageLog.objects.count() == MESSAGES
    assert sum(sent) == MESSAGES
    assert sum(1 for count in sent if count) >= 2, f"the workers did not overlap: {sent}"
