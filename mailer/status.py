"""A snapshot of the queue, the log and the lock file, for monitoring (``manage.py mailer_status``).

Monitoring runs it every minute, so it costs a handful of aggregate
queries, all but one served by an index of the queue or the log, and reads
no message data:

- the queue by priority: one ``GROUP BY`` over the sending-order index;
- the permanent failures: among the deferred rows of that index;
- the claims and the sent-but-not-recorded marks: one range of the claims
  index (a mark's claim runs for a century, see ``Message.mark_sent``);
- the oldest due message: the least of when each due message was queued or
  put back, which no index orders, so the due rows are read (PostgreSQL
  scans the queue: some 40 ms for 200,000 queued messages); the first row
  in sending order would hide a stalled queue behind one just put back;
- the log: one range of the (result, when_attempted) index.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from mailer import conf, locking
from mailer.exceptions import ConfigurationError
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    SENT_MARK,
    SENT_MARK_HOLDS,
    Message,
    MessageLog,
    datetime_now,
)

__all__ = ["FORMAT", "LockStatus", "LogCounts", "QueueStatus", "lock_path", "queue_status"]

# The version of ``QueueStatus.as_json()``: raised only when a key changes
# meaning or goes away, never when one is added.
FORMAT = 1

HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class LogCounts:
    """How many log rows of each result were written in a window: attempts, not messages.

    A message that is deferred twice then sent counts two failures and one
    success.
    """

    sent: int
    failed: int
    dont_send: int

    def as_json(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dont_send": self.dont_send}


@dataclass(frozen=True)
class LockStatus:
    """The lock file that ``send_mail`` passes take, as it stands.

    ``enabled`` is ``MAILER_USE_FILE_LOCK``; the file is looked at either
    way, since a process with other settings (a django-mailer 2.x cron job
    left behind, say) may still take it.
    """

    enabled: bool
    lock_file: str
    held: bool
    since: datetime.datetime | None
    host: str | None
    pids: tuple[int, ...]
    stale: bool

    def held_for(self, now: datetime.datetime) -> float | None:
        """Seconds between when the lock was taken and ``now``; None if it is not held."""
        return None if self.since is None else (now - self.since).total_seconds()


@dataclass(frozen=True)
class QueueStatus:
    """Everything ``queue_status`` found, as of ``time``."""

    time: datetime.datetime
    high: int
    medium: int
    low: int
    deferred: int  # every deferred message, the permanent failures among them
    other: int  # rows with a priority mailer does not know (written by hand): sent after low
    failed_permanently: int
    claimed: int
    sent_not_recorded: int
    oldest_due: datetime.datetime | None
    paused: bool
    last_hour: LogCounts
    last_day: LogCounts
    lock: LockStatus

    @property
    def to_send(self) -> int:
        """The messages a pass will try: every priority but deferred."""
        return self.high + self.medium + self.low + self.other

    @property
    def total(self) -> int:
        """Every row of the queue."""
        return self.to_send + self.deferred

    @property
    def oldest_due_age(self) -> float | None:
        """How many seconds the oldest due message has waited; None if none is due."""
        return None if self.oldest_due is None else (self.time - self.oldest_due).total_seconds()

    def as_json(self) -> dict[str, Any]:
        """The snapshot as plain JSON values: times in ISO 8601 (UTC), ages in seconds. Keys are stable."""
        return {
            "format": FORMAT,
            "time": _iso(self.time),
            "queue": {
                "high": self.high,
                "medium": self.medium,
                "low": self.low,
                "deferred": self.deferred,
                "other": self.other,
                "total": self.total,
            },
            "failed_permanently": self.failed_permanently,
            "claimed": self.claimed,
            "sent_not_recorded": self.sent_not_recorded,
            "oldest_due": None
            if self.oldest_due is None
            else {"due_since": _iso(self.oldest_due), "age_seconds": _seconds(self.oldest_due_age)},
            "paused": self.paused,
            "log": {"last_hour": self.last_hour.as_json(), "last_day": self.last_day.as_json()},
            "lock": {
                "enabled": self.lock.enabled,
                "path": self.lock.lock_file,
                "held": self.lock.held,
                "host": self.lock.host,
                "pids": list(self.lock.pids),
                "since": None if self.lock.since is None else _iso(self.lock.since),
                "held_for_seconds": _seconds(self.lock.held_for(self.time)),
                "stale": self.lock.stale,
            },
        }


def queue_status(now: datetime.datetime | None = None) -> QueueStatus:
    """Take a snapshot of the queue, the log of the last day and the lock file, as of ``now`` (by default, now).

    ``now`` is as ``django.utils.timezone.now()`` gives it (naive with
    ``USE_TZ = False``); the snapshot's times are always aware.

    Database errors (``DatabaseError``) are raised as they come; a lock
    path that is not a path raises ``ConfigurationError``. The counts are
    read one query after another, not in one transaction: each is exact,
    and they may disagree by the messages sent meanwhile.
    """
    if now is None:
        now = datetime_now()
    by_priority = _count_by_priority()
    known = (PRIORITY_HIGH, PRIORITY_MEDIUM, PRIORITY_LOW, PRIORITY_DEFERRED)
    claimed, sent_not_recorded = _count_claims(now)
    oldest_due = _oldest_due(now)
    last_hour, last_day = _log_counts(now)
    return QueueStatus(
        time=_aware(now),
        high=by_priority.get(PRIORITY_HIGH, 0),
        medium=by_priority.get(PRIORITY_MEDIUM, 0),
        low=by_priority.get(PRIORITY_LOW, 0),
        deferred=by_priority.get(PRIORITY_DEFERRED, 0),
        other=sum(count for priority, count in by_priority.items() if priority not in known),
        failed_permanently=Message.objects.deferred().filter(failed_permanently=True).count(),
        claimed=claimed,
        sent_not_recorded=sent_not_recorded,
        oldest_due=None if oldest_due is None else _aware(oldest_due),
        paused=bool(conf.get_setting("MAILER_PAUSE_SEND")),
        last_hour=last_hour,
        last_day=last_day,
        lock=_lock_status(),
    )


def lock_path() -> str:
    """The path ``send_mail`` gives lockfile (the lock file is this plus ".lock"), as ``engine.acquire_lock`` has it.

    A relative path is taken from the working directory, as the engine takes it.
    """
    path = conf.get_setting("MAILER_LOCK_PATH") or "send_mail"
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"MAILER_LOCK_PATH must be a path, not {path!r}")
    return os.fspath(path)


def _count_by_priority() -> dict[int, int]:
    rows = Message.objects.order_by().values_list("priority").annotate(count=Count("*"))
    return dict(rows)


def _count_claims(now: datetime.datetime) -> tuple[int, int]:
    """Return how many messages are claimed by a pass now, and how many are marked as sent but not recorded."""
    far_future = now + SENT_MARK_HOLDS / 2  # as ``sent_but_not_recorded`` tells a mark from a claim
    counts = Message.objects.filter(claimed_until__gt=now).aggregate(
        held=Count("*"),
        marked=Count("pk", filter=Q(claimed_until__gt=far_future, claimed_by__startswith=SENT_MARK)),
    )
    return counts["held"] - counts["marked"], counts["marked"]


def _oldest_due(now: datetime.datetime) -> datetime.datetime | None:
    """Since when the message that a pass would send now and that has waited longest has been due.

    Due: not deferred, not waiting for an automatic retry, not already sent
    (a mark). A message being sent counts: until it is recorded it has not
    gone. A message is due from when it was queued, or from when it was put
    back (``retry_after``: ``retry_deferred``, an automatic retry), so a
    message deferred for hours does not look as if it had waited all along.
    One aggregate query.
    """
    oldest: datetime.datetime | None = (
        Message.objects.filter(priority__in=[PRIORITY_HIGH, PRIORITY_MEDIUM, PRIORITY_LOW])
        .due(now)
        .exclude(claimed_by__startswith=SENT_MARK)
        .aggregate(oldest=Min(Coalesce("retry_after", "when_added")))["oldest"]
    )
    return oldest


def _log_counts(now: datetime.datetime) -> tuple[LogCounts, LogCounts]:
    """Count the log rows of each result attempted in the hour and in the day before ``now``, in one query."""
    results = {"sent": RESULT_SUCCESS, "failed": RESULT_FAILURE, "dont_send": RESULT_DONT_SEND}
    windows = {"hour": now - HOUR, "day": now - DAY}
    counts = MessageLog.objects.filter(result__in=list(results.values()), when_attempted__gte=windows["day"]).aggregate(
        **{
            f"{window}_{name}": Count("pk", filter=Q(result=result, when_attempted__gte=since))
            for window, since in windows.items()
            for name, result in results.items()
        }
    )
    hour, day = ({name: counts[f"{window}_{name}"] for name in results} for window in windows)
    return LogCounts(**hour), LogCounts(**day)


def _lock_status() -> LockStatus:
    state = locking.lock_state(lock_path())
    since = None
    if state.taken_at is not None:
        since = datetime.datetime.fromtimestamp(state.taken_at, tz=datetime.timezone.utc)
    return LockStatus(
        enabled=bool(conf.get_setting("MAILER_USE_FILE_LOCK")),
        lock_file=state.lock_file,
        held=state.held,
        since=since,
        host=state.host,
        pids=state.pids,
        stale=state.stale,
    )


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """``moment`` with its time zone: with ``USE_TZ = False`` the database gives times in ``TIME_ZONE``."""
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def _seconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
