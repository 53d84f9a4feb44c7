"""Many senders on one queue, as real processes: each message goes out exactly once and is recorded once.

A site whose mail server takes tens of milliseconds per message drains its
queue faster with several senders at once: several ``send_mail`` processes
(on several hosts, so without the lock file), or one process with several
delivery connections (``--connections N``, ``MAILER_DELIVERY_CONNECTIONS``).
Either way no message may go out twice or be lost, and every one must end
with one success row in the log.

The mail server here takes 20 ms over each message, without holding up its
other sessions, as a hosted provider does: so the senders really are
sending side by side, and a claim that two of them could both win would
show as a duplicate. tests/test_processes.py has the small version of the
several-processes test that runs on SQLite too; tests/test_concurrency.py
races threads in the test's own process.
"""

import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import MANAGE_PY, VENDOR, ProcessDatabase, manage, process_environment
from tests.smtp import Received, SMTPServer

pytestmark = pytest.mark.slow

MESSAGES = 200
PROCESSES = 4
CONNECTIONS = 4
# What a hosted mail server takes over each message, without holding up its other sessions.
SINK_DELAY = 0.02


@pytest.fixture
def slow_smtp_server(smtp_server):
    smtp_server.delay_each_message(SINK_DELAY)
    return smtp_server


def queue_messages(db: ProcessDatabase, count: int) -> set[str]:
    """Queue ``count`` messages in bulk, as a site does, in a process of its own; return their Message-IDs."""
    result = manage(
        "shell",
        "-c",
        "from django.core.mail import EmailMessage\n"
        "from mailer.backend import DbBackend\n"
        f"DbBackend().send_messages([EmailMessage(f'Message {{n}}', 'Body', 'f@example.com', [f'to{{n}}@example.com'])"
        f" for n in range({count})])",
        db=db,
    )
    assert result.returncode == 0, result.stderr
    message_ids = {message_id for (message_id,) in db.query("SELECT message_id FROM mailer_message")}
    assert len(message_ids) == count  # each queued message has a Message-ID of its own
    return message_ids


def assert_sent_and_recorded_exactly_once(server: SMTPServer, db: ProcessDatabase, queued: set[str]) -> None:
    """Each queued message reached the server once, left the queue, and has one success row in the log."""
    arrived = Counter(received.message["Message-ID"] for received in server.received)
    assert [message_id for message_id, times in arrived.items() if times > 1] == [], "sent more than once"
    assert set(arrived) == queued, f"{len(queued - set(arrived))} never arrived"
    assert db.query("SELECT COUNT(*) FROM mailer_message") == [(0,)]
    logged = Counter(db.query("SELECT message_id, result FROM mailer_messagelog"))
    assert logged == Counter({(message_id, "1"): 1 for message_id in queued})


def overlapping_sessions(received: list[Received]) -> int:
    """How many of the server's sessions were delivering at the moment the most of them were."""
    spans: dict[int, tuple[float, float]] = {}
    for message in received:
        first, last = spans.get(message.session, (message.received_at, message.received_at))
        spans[message.session] = (min(first, message.received_at), max(last, message.received_at))
    starts = [first for first, _last in spans.values()]
    return max((sum(1 for first, last in spans.values() if first <= start <= last) for start in starts), default=0)


def sent_count(stderr: str) -> int:
    """How many messages a ``send_mail`` process says it sent."""
    found = re.search(r"(\d+) sent;", stderr)
    assert found, stderr
    return int(found.group(1))


@contextmanager
def running(
    commands: list[list[str]], db: ProcessDatabase, server: SMTPServer, tmp_path: Path, **env: str
) -> Iterator[list[tuple[subprocess.Popen, Path]]]:
    """Start ``manage.py *command`` for each command, all at once; kill those still running at the end.

    Each writes its output to a file of its own (a pipe nobody reads could
    fill up and stall it); the processes are given with the file.
    """
    processes = []
    try:
        for n, command in enumerate(commands):
            log = tmp_path / f"{command[0]}-{n}.log"
            with log.open("w") as output:
                process = subprocess.Popen(
                    [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), *command],
                    env=process_environment(db, server.port, **env),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            processes.append((process, log))
        yield processes
    finally:
        for process, _log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_several_send_mail_processes_without_the_lock_share_one_queue_exactly_once(
    process_db, slow_smtp_server, tmp_path
):
    """Cron on several hosts: ``send_mail`` processes without the lock file drain one queue together."""
    if VENDOR == "sqlite":
        pytest.skip("one SQLite file is one host; tests/test_processes.py races processes on it")
    queued = queue_messages(process_db, MESSAGES)

    with running(
        [["send_mail"]] * PROCESSES, process_db, slow_smtp_server, tmp_path, MAILER_PROCESS_USE_FILE_LOCK="0"
    ) as senders:
        returncodes = [sender.wait(timeout=120) for sender, _log in senders]
    outputs = [log.read_text() for _sender, log in senders]

    assert returncodes == [0] * PROCESSES, outputs
    assert not any("Traceback" in output for output in outputs), outputs
    assert_sent_and_recorded_exactly_once(slow_smtp_server, process_db, queued)
    sent = [sent_count(output) for output in outputs]
    assert sum(sent) == MESSAGES
    assert sum(1 for count in sent if count) >= 2, f"the processes did not overlap: {sent}"


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["send_mail", "--connections", str(CONNECTIONS)], {}),
        (["runmailer"], {"MAILER_PROCESS_DELIVERY_CONNECTIONS": str(CONNECTIONS)}),
    ],
    ids=["send_mail --connections", "runmailer MAILER_DELIVERY_CONNECTIONS"],
)
def test_one_process_with_several_connections_sends_each_message_exactly_once(
    process_db, slow_smtp_server, tmp_path, command, env
):
    """One process, several delivery connections at once: no message twice, none lost, each recorded once.

    On every vendor, SQLite included: the connections' threads then take
    turns writing the one file.
    """
    queued = queue_messages(process_db, MESSAGES)

    with running(
        [command],
        process_db,
        slow_smtp_server,
        tmp_path,
        MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
        MAILER_PROCESS_EMPTY_QUEUE_SLEEP="0.2",
        **env,
    ) as [(sender, log)]:
        if command[0] == "runmailer":
            wait_until_recorded(process_db, MESSAGES, sender)
            sender.send_signal(signal.SIGTERM)
        returncode = sender.wait(timeout=120)
    output = log.read_text()

    assert returncode == 0, output
    assert "Traceback" not in output, output
    assert_sent_and_recorded_exactly_once(slow_smtp_server, process_db, queued)
    # Side by side, over at most the connections asked for, each opened once.
    assert slow_smtp_server.connections <= CONNECTIONS, f"{slow_smtp_server.connections} connections were opened"
    if command[0] == "send_mail":
        assert overlapping_sessions(slow_smtp_server.received) >= 2, "the connections did not send side by side"
    else:
        # runmailer's passes may be short (it starts one as soon as there is mail): the work was shared.
        assert len({received.session for received in slow_smtp_server.received}) >= 2, "one connection sent it all"


def wait_until_recorded(db: ProcessDatabase, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until at least ``count`` log rows have been written (or the process has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        [(logged,)] = db.query("SELECT COUNT(*) FROM mailer_messagelog")
        if logged >= count:
            return
        time.sleep(0.1)


# --------------------------------------------------------------------------
# A mail server that limits sessions, or does not answer at all
# --------------------------------------------------------------------------


def test_a_server_that_limits_sessions_gets_everything_over_the_sessions_it_took(
    process_db, slow_smtp_server, tmp_path
):
    """Postfix, Exchange and hosted services refuse a client's sessions beyond a limit (421 at the greeting).

    The server is up: the connections it refused stop, their messages go out
    over the others, and nothing is deferred as if the server were down.
    """
    slow_smtp_server.limit_sessions(2)
    queued = queue_messages(process_db, 100)

    result = manage(
        "send_mail",
        "--connections",
        str(CONNECTIONS),
        db=process_db,
        smtp_port=slow_smtp_server.port,
        MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert slow_smtp_server.sessions_refused >= 1, "the limit was never met"
    assert "cannot be reached" not in result.stderr, result.stderr
    assert "would not take another session" in result.stderr
    assert_sent_and_recorded_exactly_once(slow_smtp_server, process_db, queued)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that takes connections and never says a word, as a hung mail server does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)
        yield listener.getsockname()[1]


def test_a_hung_server_costs_one_deferred_message_however_many_connections(process_db, silent_port, tmp_path):
    """Every connection waits out the timeout (10 s in tests/process_settings.py) at once; one defers its
    message and ends the pass, the others give theirs back: a pass with a server down sets back one message,
    as with one connection, and costs about one timeout.
    """
    queue_messages(process_db, 50)

    started = time.monotonic()
    result = manage(
        "send_mail",
        "--connections",
        str(CONNECTIONS),
        db=process_db,
        smtp_port=silent_port,
        MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
        timeout=120,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("cannot be reached") == 1, result.stderr
    assert process_db.query("SELECT priority, COUNT(*) FROM mailer_message GROUP BY priority ORDER BY priority") == [
        (2, 49),
        (4, 1),
    ]
    assert process_db.query("SELECT COUNT(*) FROM mailer_message WHERE claimed_until IS NOT NULL") == [(0,)]
    assert process_db.query("SELECT result, COUNT(*) FROM mailer_messagelog GROUP BY result") == [("3", 1)]
    assert elapsed < 60, "more than one timeout"
