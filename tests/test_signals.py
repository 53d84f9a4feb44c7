"""SIGTERM, SIGINT and SIGHUP stop ``send_mail`` and ``runmailer`` gracefully, as real processes.

What systemd, Docker and Kubernetes send, and Ctrl-C: the message in flight
is finished and recorded, no other is sent, claims and the lock are given
back, and the command exits 0. A second signal stops it at once.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import MANAGE_PY, manage, process_environment

pytestmark = pytest.mark.slow


def run_in_process(db, code: str) -> str:
    result = manage("shell", "-c", f"import json, mailer; from mailer.models import Message, MessageLog; {code}", db=db)
    assert result.returncode == 0, result.stderr
    return result.stdout


def queue(db, count: int) -> None:
    run_in_process(
        db, f"[mailer.send_mail(f'Message {{n}}', 'B', 'f@example.com', ['t@example.com']) for n in range({count})]"
    )


def queue_state(db) -> dict:
    # The last line: Django's shell may say first what it imported by itself.
    return json.loads(
        run_in_process(
            db,
            "print(json.dumps({'queued': Message.objects.count(),"
            " 'claimed': Message.objects.filter(claimed_until__isnull=False).count(),"
            " 'logged': list(MessageLog.objects.values_list('result', flat=True))}))",
        ).splitlines()[-1]
    )


def start(command: str, db, smtp_port: int, lock_path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), command],
        env=process_environment(db, smtp_port, MAILER_PROCESS_LOCK_PATH=str(lock_path), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_during_message(server, process: subprocess.Popen, number: int, signum: int, hold: float = 0.5) -> None:
    """Send ``signum`` to ``process`` while the server is taking its message number ``number`` (from 1)."""

    def on_message(received):
        if len(server.received) == number - 1:
            process.send_signal(signum)
            time.sleep(hold)  # the message is still in flight when the signal lands

    server.on_message(on_message)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_ends_send_mail_after_the_message_in_flight(process_db, smtp_server, tmp_path, signum):
    queue(process_db, 8)
    lock_path = tmp_path / "send_mail"
    process = start("send_mail", process_db, smtp_server.port, lock_path)
    signal_during_message(smtp_server, process, 3, signum)

    out, err = process.communicate(timeout=60)

    assert process.returncode == 0, err
    assert len(smtp_server.received) == 3  # the one in flight went out; no other was begun
    state = queue_state(process_db)
    assert state == {"queued": 5, "claimed": 0, "logged": ["1", "1", "1"]}
    assert not (tmp_path / "send_mail.lock").exists()

    # The next run sends the rest, and nothing twice.
    smtp_server.on_message(None)
    rerun = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(lock_path))
    assert rerun.returncode == 0, rerun.stderr
    subjects = [r.message["Subject"] for r in smtp_server.received]
    assert sorted(subjects) == sorted(f"Message {n}" for n in range(8))
    assert len({r.message["Message-ID"] for r in smtp_server.received}) == 8


def test_a_second_signal_stops_send_mail_at_once(process_db, smtp_server, tmp_path):
    """The server takes 20 s over the message in flight; the second SIGTERM does not wait for it."""
    queue(process_db, 3)
    process = start("send_mail", process_db, smtp_server.port, tmp_path / "send_mail")

    def slow_first_message(received):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(20)

    smtp_server.on_message(slow_first_message)
    started = time.monotonic()
    process.communicate(timeout=60)

    assert time.monotonic() - started < 15
    assert process.returncode != 0
    assert queue_state(process_db)["queued"] == 3  # nothing was recorded as sent; its claim lapses by itself


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_a_sleeping_runmailer_promptly_with_exit_status_0(process_db, smtp_server, tmp_path, signum):
    process = start(
        "runmailer", process_db, smtp_server.port, tmp_path / "send_mail", MAILER_PROCESS_EMPTY_QUEUE_SLEEP="30"
    )
    time.sleep(3)  # started, and asleep for 30 s
    assert process.poll() is None

    sent_at = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=20)

    assert time.monotonic() - sent_at < 5
    assert process.returncode == 0, err
    assert out.rstrip().endswith("Stopped.")


def test_a_signal_ends_runmailer_after_the_message_in_flight(process_db, smtp_server, tmp_path):
    queue(process_db, 6)
    process = start(
        "runmailer", process_db, smtp_server.port, tmp_path / "send_mail", MAILER_PROCESS_EMPTY_QUEUE_SLEEP="1"
    )
    signal_during_message(smtp_server, process, 2, signal.SIGTERM)

    out, err = process.communicate(timeout=60)

    assert process.returncode == 0, err
    assert out.rstrip().endswith("Stopped.")
    assert len(smtp_server.received) == 2
    assert queue_state(process_db) == {"queued": 4, "claimed": 0, "logged": ["1", "1"]}


def test_a_signal_the_process_was_told_to_ignore_stays_ignored(process_db, smtp_server, tmp_path):
    """Started under nohup (SIGHUP ignored), logging out of the terminal must not stop the mail."""
    queue(process_db, 5)
    lock_path = tmp_path / "send_mail"
    process = subprocess.Popen(
        [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), "send_mail"],
        env=process_environment(process_db, smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(lock_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    signal_during_message(smtp_server, process, 2, signal.SIGHUP)

    out, err = process.communicate(timeout=60)

    assert process.returncode == 0, err
    assert len(smtp_server.received) == 5
    assert queue_state(process_db)["queued"] == 0


def test_a_second_signal_with_several_connections_gives_back_what_no_connection_had_begun(
    process_db, smtp_server, tmp_path
):
    """``send_mail --connections 4``: each connection holds a few claims besides the message it is sending.

    The second SIGTERM stops the process at once; the messages in flight keep
    their claims (the server may yet take them), but the rest must not wait
    ``MAILER_CLAIM_TIMEOUT`` (600 s) for the next run.
    """
    connections = 4
    queue(process_db, 60)
    smtp_server.delay_each_message(5)  # every connection is in the middle of a message when the signals land
    lock_path = tmp_path / "send_mail"
    process = start(
        "send_mail", process_db, smtp_server.port, lock_path, MAILER_PROCESS_DELIVERY_CONNECTIONS=str(connections)
    )
    deadline = time.monotonic() + 60
    while smtp_server.messages_begun < connections and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert smtp_server.messages_begun == connections

    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)

    assert process.returncode != 0
    state = queue_state(process_db)
    assert state == {"queued": 60, "claimed": connections, "logged": []}  # only those in flight are held

    # The next run sends the rest at once; not the ones that were in flight, which the server may have taken.
    smtp_server.delay_each_message(0)
    rerun = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(lock_path))
    assert rerun.returncode == 0, rerun.stderr
    assert queue_state(process_db) == {"queued": connections, "claimed": connections, "logged": ["1"] * 56}
    assert len({r.message["Message-ID"] for r in smtp_server.received}) == len(smtp_server.received) == 56
