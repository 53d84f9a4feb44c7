"""``manage.py mailer_status``: the queue, the log and the lock file at a glance, for people and for monitoring."""

import datetime
import json
import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError
from django.utils.timesince import timesince
from django.utils.translation import gettext, gettext_lazy, ngettext

from mailer.exceptions import ConfigurationError
from mailer.management.commands._translated import TranslatedCommand
from mailer.status import LockStatus, LogCounts, QueueStatus, queue_status


class Command(TranslatedCommand):
    help = gettext_lazy(
        "Show the mail queue, the log of the last day and the lock file. With --max-age or --max-deferred, "
        "exit with status 1 when the queue is past them (for monitoring)."
    )

    # Monitoring runs it every minute: Django's system checks would cost more than the queries.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            help=gettext("Print the status as one JSON object, for programs."),
        )
        parser.add_argument(
            "--max-age",
            type=float,
            metavar="SECONDS",
            help=gettext("Exit with status 1 if the oldest message due to be sent has waited longer than SECONDS."),
        )
        parser.add_argument(
            "--max-deferred",
            type=int,
            metavar="N",
            help=gettext("Exit with status 1 if more than N messages are deferred."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            status = queue_status()
        except DatabaseError as exc:
            raise CommandError(
                gettext("cannot read the mail queue: %(error)s") % {"error": _one_line(exc)}, returncode=1
            ) from exc
        except (ConfigurationError, ImproperlyConfigured) as exc:
            raise CommandError(
                gettext("configuration error: %(error)s") % {"error": _one_line(exc)}, returncode=1
            ) from exc
        exceeded = _exceeded(status, options["max_age"], options["max_deferred"])
        if options["json"]:
            document = status.as_json()
            document["exceeded"] = sorted(exceeded)
            self.stdout.write(json.dumps(document, indent=2, sort_keys=True))
        else:
            self.stdout.write(_report(status))
        for problem in exceeded.values():
            self.stderr.write(problem)
        if exceeded:
            sys.exit(1)


def _exceeded(status: QueueStatus, max_age: float | None, max_deferred: int | None) -> dict[str, str]:
    """The thresholds the queue is past, by name ("max_age", "max_deferred"), each with a sentence saying so."""
    exceeded = {}
    age = status.oldest_due_age
    if max_age is not None and age is not None and age > max_age:
        exceeded["max_age"] = gettext(
            "the oldest message due has waited %(age)d seconds, more than --max-age %(limit)s"
        ) % {"age": age, "limit": _number(max_age)}
    if max_deferred is not None and status.deferred > max_deferred:
        exceeded["max_deferred"] = ngettext(
            "%(count)d message is deferred, more than --max-deferred %(limit)d",
            "%(count)d messages are deferred, more than --max-deferred %(limit)d",
            status.deferred,
        ) % {"count": status.deferred, "limit": max_deferred}
    return exceeded


def _report(status: QueueStatus) -> str:
    """The status for a person: one short line per subject, values aligned."""
    rows = [
        (
            gettext("Queue"),
            gettext("%(high)d high, %(medium)d medium, %(low)d low priority") % _priorities(status),
        ),
        (
            gettext("Deferred"),
            gettext("%(deferred)d, of which %(failed)d failed permanently")
            % {"deferred": status.deferred, "failed": status.failed_permanently},
        ),
        (gettext("Being sent"), str(status.claimed)),
    ]
    if status.sent_not_recorded:
        rows.append((gettext("Sent, not recorded"), str(status.sent_not_recorded)))
    rows.append((gettext("Oldest due"), _oldest_due(status)))
    if status.paused:
        rows.append((gettext("Sending"), gettext("paused (MAILER_PAUSE_SEND)")))
    rows.append((gettext("Last hour"), _log_line(status.last_hour)))
    rows.append((gettext("Last day"), _log_line(status.last_day)))
    rows.append((gettext("Lock file"), status.lock.lock_file))
    rows.append((gettext("Lock"), _lock_line(status.lock, status.time)))
    width = max(len(label) for label, _value in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _priorities(status: QueueStatus) -> dict[str, int]:
    # Rows with a priority mailer does not know are sent after the low ones.
    return {"high": status.high, "medium": status.medium, "low": status.low + status.other}


def _oldest_due(status: QueueStatus) -> str:
    if status.oldest_due is None or status.oldest_due_age is None:
        return gettext("none")
    return gettext("%(age)s ago (due since %(when)s)") % {
        "when": _time(status.oldest_due),
        "age": _duration(status.oldest_due_age),
    }


def _log_line(counts: LogCounts) -> str:
    return gettext("%(sent)d sent, %(failed)d failed, %(dont_send)d not sent (don't-send list)") % {
        "sent": counts.sent,
        "failed": counts.failed,
        "dont_send": counts.dont_send,
    }


def _lock_line(lock: LockStatus, now: datetime.datetime) -> str:
    if not lock.held:
        if not lock.enabled:
            return gettext("free; not used (MAILER_USE_FILE_LOCK is off)")
        return gettext("free")
    held_for = lock.held_for(now)
    since = (
        ""
        if lock.since is None or held_for is None
        else gettext(" since %(when)s (%(age)s)") % {"when": _time(lock.since), "age": _duration(held_for)}
    )
    if lock.host is None:
        state = gettext("held%(since)s; its holder cannot be identified") % {"since": since}
    elif lock.stale:
        state = gettext(
            "stale: held%(since)s by process %(pids)s of this host, which is no longer running; the next pass breaks it"
        ) % {"since": since, "pids": _pids(lock.pids)}
    else:
        state = gettext("held%(since)s by process %(pids)s on %(host)s") % {
            "since": since,
            "pids": _pids(lock.pids),
            "host": lock.host,
        }
    if not lock.enabled:
        return gettext("%(state)s; not used here (MAILER_USE_FILE_LOCK is off)") % {"state": state}
    return state


def _pids(pids: tuple[int, ...]) -> str:
    if not pids:
        return "?"
    # Translators: between the pids a lock file's name can be read as, when it cannot tell which.
    return gettext(" or ").join(str(pid) for pid in pids)


def _duration(seconds: float) -> str:
    if seconds < 60:
        count = max(int(seconds), 0)
        return ngettext("%(count)d second", "%(count)d seconds", count) % {"count": count}
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    # Django's own words ("2 hours, 5 minutes"), joined with no-break spaces for web pages.
    return timesince(now - datetime.timedelta(seconds=seconds), now).replace("\xa0", " ")


def _time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _one_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says, and its type: database drivers add lines of SQL and hints."""
    lines = str(exc).strip().splitlines()
    return f"{lines[0] if lines else ''} ({type(exc).__name__})"
