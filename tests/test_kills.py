"""``send_mail`` stopped at random moments, as real processes: by SIGKILL 20 times, by SIGTERM 20 times.

A process killed outright (SIGKILL, the out-of-memory killer, a power cut)
can leave behind messages that the mail server took but the queue never
recorded: the engine promises that there are never more than two (the one
being recorded while the next goes out), so a kill costs at most two
duplicates and never a lost message. It also leaves its
lock file behind, and the next run must not be held up by it. A SIGTERM (what
systemd, Docker and Kubernetes send) costs nothing: the message in flight is
finished and recorded, and the command exits 0.

The moments are drawn from a seeded generator. The seed is printed (pytest
shows it with a failure); ``MAILER_KILL_SEED=<seed>`` replays the same
choices (the machine's timing still varies a little around them).
"""

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailer import engine
from tests.processes import ProcessDatabase, manage
from tests.smtp import Received, SMTPServer
from tests.test_signals import run_in_process, start

pytestmark = pytest.mark.slow

KILLS = 20
# Each kill interrupts a run over a batch of its own, which a drain then finishes: 500 messages in all.
KILL_BATCH = 25
TERMS = 20
TERM_MESSAGES = 500
# No run is let go past this many messages of its own before it is signalled (while that one is in
# flight): a kill always lands before its batch is done, and 20 SIGTERMed runs never empty the queue.
BACKSTOP = 25
# What send_all logs when another process holds the lock (or seems to).
LOCK_HELD = ("lock already in place", "waiting for the lock timed out")
# A claim's expiry well in the past, in a form every vendor reads as a timestamp.
LONG_AGO = "2000-01-01 00:00:00"


@pytest.fixture
def seed() -> int:
    seed = int(os.environ.get("MAILER_KILL_SEED") or random.randrange(2**32))  # noqa: S311 -- not a secret
    print(f"MAILER_KILL_SEED={seed}")
    return seed


@dataclass(frozen=True)
class Moment:
    """When a run is signalled.

    - "while sending": from the server while it takes the run's message number
      ``message``, which stays in flight (unanswered) for ``delay`` seconds more;
    - "after a message": ``delay`` seconds after the server took that message
      (the reply, the recording, the next claim);
    - "after start": ``delay`` seconds after the process was started (Django
      starting up, the lock, the first claim, sending).
    """

    kind: str
    message: int = 0
    delay: float = 0.0

    def __str__(self) -> str:
        at = f" {self.message}" if self.kind != "after start" else ""
        return f"{self.kind}{at} (+{self.delay:.3f} s)"


def kill_moment(rng: random.Random) -> Moment:
    kind = rng.choice(["while sending", "after a message", "after start"])
    if kind == "while sending":
        return Moment(kind, rng.randint(1, 20), rng.uniform(0.02, 0.1))
    if kind == "after a message":
        return Moment(kind, rng.randint(1, 20), rng.uniform(0, 0.04))
    # Django takes about half a second to start: some land before the pass, some in it.
    return Moment(kind, 0, rng.uniform(0, 1.0))


def term_moment(rng: random.Random) -> Moment:
    """A moment in the pass: the signal handlers are in place once the run's first message has arrived."""
    kind = rng.choice(["while sending", "after a message", "after a message"])
    if kind == "while sending":
        return Moment(kind, rng.randint(1, 10), rng.uniform(0, 0.2))
    return Moment(kind, rng.randint(1, 10), rng.choice([rng.uniform(0, 0.05), rng.uniform(0, 0.4)]))


@dataclass
class Signaller:
    """Sends ``signum`` once to one run of ``send_mail`` at ``moment``, or at the latest during its BACKSTOP-th message.

    ``in_flight`` is then the subject of the message the server was holding
    unanswered when the signal went (None if it went from a timer), and
    ``at_message`` how many of the run's messages had reached the server.
    """

    server: SMTPServer
    process: subprocess.Popen
    signum: int
    moment: Moment
    fired: bool = False
    in_flight: str | None = None
    at_message: int = 0
    _first: int = 0
    _reached: int = 0  # how many had reached the server when a delayed signal was set
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timers: list[threading.Timer] = field(default_factory=list)

    def arm(self) -> "Signaller":
        self._first = len(self.server.received)
        self.server.on_message(self._on_message)
        if self.moment.kind == "after start":
            self._later(self.moment.delay)
        return self

    def disarm(self) -> None:
        self.server.on_message(None)
        for timer in self._timers:
            timer.cancel()

    def _on_message(self, received: Received) -> None:
        number = len(self.server.received) - self._first + 1  # the one being taken is not in the list yet
        if number == BACKSTOP or (self.moment.kind == "while sending" and number == self.moment.message):
            if self._fire(number, received.message["Subject"]):
                time.sleep(self.moment.delay if self.moment.kind == "while sending" else 0.05)  # still unanswered
        elif self.moment.kind == "after a message" and number == self.moment.message:
            self._reached = number  # counted before the server lists it: a short delay may fire first
            self._later(self.moment.delay)

    def _later(self, delay: float) -> None:
        timer = threading.Timer(delay, self._fire)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _fire(self, number: int | None = None, subject: str | None = None) -> bool:
        with self._lock:
            if self.fired:
                return False
            self.fired = True
            self.in_flight = subject
            if number is None:
                number = max(self._reached, len(self.server.received) - self._first)
            self.at_message = number
            self.process.send_signal(self.signum)
            return True


def finish(process: subprocess.Popen, context: str, timeout: float = 120) -> str:
    """Wait for ``process`` to end; return its log (stderr). Kill it if it does not end in time."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"{context}: send_mail did not end within {timeout} s; its log:\n{tail(err)}") from None
    return err


def tail(log: str, lines: int = 30) -> str:
    return "\n".join(log.splitlines()[-lines:])


def queue_subjects(db: ProcessDatabase, subjects: list[str]) -> None:
    run_in_process(db, f"[mailer.send_mail(s, 'B', 'f@example.com', ['t@example.com']) for s in {subjects!r}]")


def count(db: ProcessDatabase, where: str = "") -> int:
    return int(db.query(f"SELECT COUNT(*) FROM mailer_message {where}")[0][0])  # noqa: S608 -- our own SQL


def log_results(db: ProcessDatabase) -> dict[str, int]:
    return {result: int(n) for result, n in db.query("SELECT result, COUNT(*) FROM mailer_messagelog GROUP BY result")}


def subjects_of(received: list[Received]) -> list[str]:
    return [r.message["Subject"] for r in received]


def assert_no_wait_for_a_lock(log: str, context: str) -> None:
    held = [line for line in log.splitlines() if any(text in line for text in LOCK_HELD)]
    assert not held, f"{context}: the run found the lock held, though no other run was alive: {held}\n{tail(log)}"


def assert_every_message_once_per_id(received: list[Received], context: str) -> None:
    """A message sent twice carries the same Message-ID both times, so the receiving side can drop the copy."""
    ids: dict[str, set[str]] = {}
    for r in received:
        ids.setdefault(r.message["Subject"], set()).add(r.message["Message-ID"])
    assert all(len(message_ids) == 1 for message_ids in ids.values()), context
    assert len(set.union(*ids.values())) == len(ids), context


def run_signalled(
    db: ProcessDatabase, server: SMTPServer, lock_path: Path, signum: int, moment: Moment, context: str
) -> tuple[subprocess.Popen, Signaller, str]:
    process = start("send_mail", db, server.port, lock_path)
    signaller = Signaller(server, process, signum, moment).arm()
    try:
        log = finish(process, context)
    finally:
        signaller.disarm()
    return process, signaller, log


def drain(db: ProcessDatabase, server: SMTPServer, lock_path: Path) -> subprocess.CompletedProcess:
    return manage("send_mail", db=db, smtp_port=server.port, timeout=180, MAILER_PROCESS_LOCK_PATH=str(lock_path))


def let_claims_lapse(db: ProcessDatabase) -> None:
    """Move the claims a killed run left into the past, as MAILER_CLAIM_TIMEOUT (10 minutes) would."""
    db.execute("UPDATE mailer_message SET claimed_until = %s WHERE claimed_until IS NOT NULL", LONG_AGO)


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_at_most_two_messages_per_kill(
    process_db, smtp_server, tmp_path, seed
):
    """20 times: a run is killed over 25 fresh messages, then a drain must send the rest past its stale lock.

    The drain must not find the lock held (its holder is dead), must send
    every message the killed run did not record, and may send again only
    the (at most two) messages the killed run had sent but not recorded.
    """
    rng = random.Random(seed)  # noqa: S311 -- moments, not secrets
    lock_path = tmp_path / "send_mail"
    stale_locks = 0
    expected: list[str] = []
    for kill in range(1, KILLS + 1):
        batch = [f"Kill {kill:02}-{n:02}" for n in range(KILL_BATCH)]
        expected += batch
        queue_subjects(process_db, batch)
        first = len(smtp_server.received)
        moment = kill_moment(rng)
        context = f"MAILER_KILL_SEED={seed}, kill {kill} {moment}"

        victim, signaller, victim_log = run_signalled(
            process_db, smtp_server, lock_path, signal.SIGKILL, moment, context
        )

        assert victim.returncode == -signal.SIGKILL, f"{context}: not killed:\n{tail(victim_log)}"
        assert_no_wait_for_a_lock(victim_log, context)
        stale_locks += Path(f"{lock_path}.lock").exists()
        # A run holds the few messages it claimed at once, and no others.
        assert count(process_db, "WHERE claimed_until IS NOT NULL") <= engine.CLAIM_BATCH_MAX, context
        let_claims_lapse(process_db)
        left = count(process_db)
        assert left >= 1, context  # killed before its batch was done (at the latest in flight with the last)

        killed_run_sent = subjects_of(smtp_server.received[first:])
        result = drain(process_db, smtp_server, lock_path)

        context += f", kill log:\n{tail(victim_log, 8)}\ndrain log:\n{tail(result.stderr)}"
        assert result.returncode == 0, context
        assert_no_wait_for_a_lock(result.stderr, context)
        assert f"{left} sent; 0 deferred; 0 failed permanently" in result.stderr, context
        assert count(process_db) == 0, context
        arrived = Counter(subjects_of(smtp_server.received[first:]))
        assert set(arrived) == set(batch), context
        duplicates = [subject for subject, n in arrived.items() for _ in range(n - 1)]
        # Only the last two the killed run sent (the server may have been holding the last) can have gone
        # out unrecorded.
        if signaller.in_flight is not None and signaller.in_flight not in killed_run_sent[-1:]:
            killed_run_sent.append(signaller.in_flight)
        last_two = killed_run_sent[-2:]
        assert len(duplicates) <= 2 and set(duplicates) <= set(last_two), f"{context}: sent twice: {duplicates}"

    arrived = Counter(subjects_of(smtp_server.received))
    assert sorted(arrived) == sorted(expected)
    copies = sum(arrived.values()) - len(expected)
    print(f"{KILLS} kills, {stale_locks} stale locks left, {copies} messages sent twice")
    assert copies <= 2 * KILLS
    assert_every_message_once_per_id(smtp_server.received, f"MAILER_KILL_SEED={seed}")
    # Each recorded once, as sent: nothing deferred, nothing failed, nothing left.
    assert log_results(process_db) == {"1": len(expected)}
    assert count(process_db) == 0
    # Every kill during a pass leaves the lock file behind: the drains did meet stale locks.
    assert stale_locks > 0


def test_sigterm_at_random_moments_sends_every_message_exactly_once_and_exits_0(
    process_db, smtp_server, tmp_path, seed
):
    """20 runs over one queue of 500 each get a SIGTERM during the pass: each exits 0 and gives everything back.

    After each: every message that reached the server is recorded, no claim
    and no lock is left, and the next run simply goes on; in the end each
    message arrived exactly once.
    """
    rng = random.Random(seed)  # noqa: S311 -- moments, not secrets
    lock_path = tmp_path / "send_mail"
    expected = [f"Term {n:03}" for n in range(TERM_MESSAGES)]
    queue_subjects(process_db, expected)

    for term in range(1, TERMS + 1):
        first = len(smtp_server.received)
        moment = term_moment(rng)
        context = f"MAILER_KILL_SEED={seed}, SIGTERM {term} {moment}"

        process, signaller, log = run_signalled(process_db, smtp_server, lock_path, signal.SIGTERM, moment, context)

        context += f":\n{tail(log)}"
        assert signaller.fired, f"{context}: the run ended before the signal"
        assert process.returncode == 0, context
        assert_no_wait_for_a_lock(log, context)
        sent = len(smtp_server.received) - first
        assert sent >= signaller.at_message >= 1, context
        if signaller.in_flight is not None:
            # Signalled while the server held that message: it was finished, no other was begun.
            assert sent == signaller.at_message, context
            assert subjects_of(smtp_server.received)[-1] == signaller.in_flight, context
        assert not Path(f"{lock_path}.lock").exists(), context
        assert count(process_db, "WHERE claimed_until IS NOT NULL") == 0, context
        # Every message that went out is recorded as sent, once.
        assert log_results(process_db) == {"1": len(smtp_server.received)}, context
        assert count(process_db) == TERM_MESSAGES - len(smtp_server.received), context

    result = drain(process_db, smtp_server, lock_path)

    assert result.returncode == 0, tail(result.stderr)
    assert sorted(subjects_of(smtp_server.received)) == expected  # each exactly once
    assert_every_message_once_per_id(smtp_server.received, f"MAILER_KILL_SEED={seed}")
    assert log_results(process_db) == {"1": TERM_MESSAGES}
    assert count(process_db) == 0
