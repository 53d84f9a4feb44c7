"""The queue (``Message``), the log (``MessageLog``) and the don't-send list.

Tables, columns and names are those of django-mailer 2.x, so an existing
database keeps working; the claim columns on ``Message`` are ours.
"""

import copy
import dataclasses
import datetime
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from django.core.exceptions import EmptyResultSet
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models.functions import Length, Lower
from django.utils.timezone import now as datetime_now
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from mailer import conf
from mailer.addresses import bare_address, check_addresses, is_plain, is_utf8
from mailer.codec import SEARCH_COLUMNS, db_to_email, decode, email_to_db, search_columns, storable_text
from mailer.exceptions import UndecodableData, UnstorableEmail
from mailer.message_id import ensure_message_id, get_message_id
from mailer.priority import (
    PRIORITIES,
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MAPPING,
    PRIORITY_MEDIUM,
    get_priority,
)
from mailer.redaction import keeps_message_data, loggable

__all__ = [
    "PRIORITY_HIGH",
    "PRIORITY_MEDIUM",
    "PRIORITY_LOW",
    "PRIORITY_DEFERRED",
    "PRIORITIES",
    "PRIORITY_MAPPING",
    "RESULT_SUCCESS",
    "RESULT_DONT_SEND",
    "RESULT_FAILURE",
    "RESULT_CODES",
    "Message",
    "MessageLog",
    "DontSendEntry",
    "DuplicateAddress",
    "make_message",
    "email_to_db",
    "db_to_email",
    "get_message_id",
    "datetime_now",
]

RESULT_SUCCESS = "1"
RESULT_DONT_SEND = "2"
RESULT_FAILURE = "3"

RESULT_CODES = (
    (RESULT_SUCCESS, "success"),
    (RESULT_DONT_SEND, "don't send"),
    (RESULT_FAILURE, "failure"),
)

logger = logging.getLogger(__name__)

# Before the token of a pass in ``Message.claimed_by``: that pass sent the message but could not record it.
SENT_MARK = "sent:"
# How long the claim of a message so marked runs: for ever, in effect.
SENT_MARK_HOLDS = datetime.timedelta(days=36500)


class MessageQuerySet(models.QuerySet["Message", "Message"]):
    def high_priority(self) -> "MessageQuerySet":
        """The high priority messages in the queue."""
        return self.filter(priority=PRIORITY_HIGH)

    def medium_priority(self) -> "MessageQuerySet":
        """The medium priority messages in the queue."""
        return self.filter(priority=PRIORITY_MEDIUM)

    def low_priority(self) -> "MessageQuerySet":
        """The low priority messages in the queue."""
        return self.filter(priority=PRIORITY_LOW)

    def non_deferred(self) -> "MessageQuerySet":
        """The messages that ``send_mail`` will try."""
        return self.exclude(priority=PRIORITY_DEFERRED)

    def deferred(self) -> "MessageQuerySet":
        """The messages that failed and wait for ``retry_deferred``."""
        return self.filter(priority=PRIORITY_DEFERRED)

    def retry_deferred(self, new_priority: int = PRIORITY_MEDIUM) -> int:
        """Put deferred messages back in the queue, within ``MAILER_EMAIL_MAX_RETRIES``; return how many.

        Permanent failures stay where they are: the server refused them for
        good, and only a human (``requeue_failed``) may decide otherwise.
        """
        queryset = self.deferred().filter(failed_permanently=False)
        max_retries = conf.get_setting("MAILER_EMAIL_MAX_RETRIES")
        if max_retries is not None:
            queryset = queryset.filter(retry_count__lt=max_retries)
        # retry_after: due from now on, so that monitoring counts its wait from now (mailer.status), not from
        # when it was first queued.
        return queryset.update(
            priority=new_priority, retry_count=models.F("retry_count") + 1, retry_after=datetime_now()
        )

    def failed_permanently(self) -> "MessageQuerySet":
        """The messages the mail server refused for good (a 5xx reply), kept for a human to read."""
        return self.filter(failed_permanently=True)

    def requeue_failed(self, new_priority: int = PRIORITY_MEDIUM) -> int:
        """Put permanent failures back in the queue, whatever their retry count; return how many."""
        return self.failed_permanently().update(
            priority=new_priority,
            failed_permanently=False,
            retry_count=models.F("retry_count") + 1,
            retry_after=datetime_now(),
        )

    def claimable(self, now: datetime.datetime) -> "MessageQuerySet":
        """The messages no worker holds: never claimed, released, or whose claim has lapsed."""
        return self.filter(models.Q(claimed_until__isnull=True) | models.Q(claimed_until__lte=now))

    def due(self, now: datetime.datetime) -> "MessageQuerySet":
        """The messages not waiting for an automatic retry (``MAILER_RETRY_BACKOFF``) at ``now``."""
        return self.filter(models.Q(retry_after__isnull=True) | models.Q(retry_after__lte=now))

    def mark_sent(self, pk: int, token: str) -> bool:
        """Mark message ``pk``, which the pass ``token`` sent but could not record, as sent; return whether it was.

        Its claim then never lapses: the message waits for a pass to record
        it (``sent_but_not_recorded``), and no pass sends it again.
        """
        updated: int = self.filter(pk=pk, claimed_by=token).update(
            claimed_by=SENT_MARK + token, claimed_until=datetime_now() + SENT_MARK_HOLDS
        )
        return updated == 1

    def take_for_recording(self, message: "Message", token: str) -> bool:
        """Take a message marked by ``mark_sent`` for the pass ``token`` to record; return whether no other had.

        So that two workers do not both log it.
        """
        marked = SENT_MARK + token
        taken: int = self.filter(pk=message.pk, claimed_by=message.claimed_by).update(claimed_by=marked)
        message.claimed_by = marked
        return taken == 1

    def sent_but_not_recorded(self) -> "MessageQuerySet":
        """The messages marked by ``mark_sent``.

        Found by their claims, which run for a century (the index on
        ``claimed_until`` serves every pass's look for them).
        """
        far_future = datetime_now() + SENT_MARK_HOLDS / 2
        return self.filter(claimed_until__gt=far_future, claimed_by__startswith=SENT_MARK)

    def claim_batch(self, token: str, until: datetime.datetime, size: int) -> list[tuple[int, int]]:
        """Claim up to ``size`` of these messages for the pass ``token`` until ``until``.

        Return their ids in sending order, each with the length of its
        message data (so that the caller can read them in groups of bounded
        size without asking again).

        The caller orders and filters the queryset (the due, claimable
        messages, in sending order). One short transaction: where the
        database can skip rows that other workers are claiming at this very
        moment (PostgreSQL, MariaDB 10.6+, MySQL 8), ``SELECT ... FOR UPDATE
        SKIP LOCKED`` then an UPDATE, so that workers never wait for each
        other; on SQLite, which has one writer at a time, a single
        conditional UPDATE. Elsewhere each candidate is claimed on its own.

        A claim writes: it goes to the database the router writes messages
        to, even where a replica serves their reads.
        """
        return self.claim_and_read(token, until, size).taken

    def claim_and_read(
        self,
        token: str,
        until: datetime.datetime,
        size: int,
        read_bytes: int = 0,
        stand_ins: dict[Any, Any] | None = None,
    ) -> "Claim":
        """``claim_batch``, which on PostgreSQL also reads what the pass needs next, in the same statement.

        There the claimed rows whose message data is at most ``read_bytes //
        size`` characters long come back whole (so the claimed messages
        read together stay within ``read_bytes``), and the statement says
        whether the don't-send list is empty and whether messages wait to be
        recorded (``sent_but_not_recorded``): for a message queued alone,
        the claim is then the only query before it goes out.

        ``stand_ins``: this queryset was built with these values standing in
        for the real ones (a pass's token, the time); its SQL is compiled
        once and kept on it, and the real values are put in its place at
        each claim. Only for claims made in one statement
        (``claims_in_one_statement``): elsewhere they raise ``ValueError``.
        """
        if self._db is None:  # type: ignore[attr-defined]  # no database chosen: the router decides
            return self.using(router.db_for_write(self.model)).claim_and_read(token, until, size, read_bytes, stand_ins)
        if self.claims_in_one_statement():
            return self._claim_in_one_statement(token, until, size, read_bytes, stand_ins or {})
        if stand_ins:
            raise ValueError("stand-in values are only for claims made in one statement (claims_in_one_statement)")
        database = connections[self.db]
        all_messages = self.model._default_manager.using(self.db)
        size_of_data = Length("message_data")
        if database.features.has_select_for_update_skip_locked:
            with transaction.atomic(using=self.db):
                claimed = list(self.select_for_update(skip_locked=True).values_list("pk", size_of_data)[:size])
                all_messages.filter(pk__in=[pk for pk, _size in claimed]).update(claimed_by=token, claimed_until=until)
            return Claim(claimed)
        if database.features.allow_sliced_subqueries_with_in:
            # The subquery runs inside the UPDATE, under SQLite's write lock: no other worker moves in between.
            all_messages.filter(pk__in=self.values("pk")[:size]).update(claimed_by=token, claimed_until=until)
            return Claim(
                list(
                    all_messages.filter(claimed_by=token, claimed_until=until)
                    .order_by(*self.query.order_by)
                    .values_list("pk", size_of_data)
                )
            )
        candidates = list(self.values_list("pk", size_of_data)[:size])
        return Claim([(pk, length) for pk, length in candidates if all_messages.claim(pk, token, until)])

    def claims_in_one_statement(self) -> bool:
        """Whether ``claim_and_read`` claims these messages in one statement, which reads them too: on
        PostgreSQL, in autocommit, for messages ordered by fields.
        """
        if self._db is None:  # type: ignore[attr-defined]
            return self.using(router.db_for_write(self.model)).claims_in_one_statement()
        database = connections[self.db]
        return database.vendor == "postgresql" and database.get_autocommit() and self._sorts_by_fields()

    def _sorts_by_fields(self) -> bool:
        """Whether these messages are ordered, by fields that are never NULL only (as the engine orders them):
        the rows of ``_claim_in_one_statement`` are sorted by them in Python.
        """
        order = self.query.order_by
        if not order or not all(isinstance(term, str) for term in order):
            return False
        fields = {field.name: field for field in self.model._meta.concrete_fields}
        names = [str(term).lstrip("-") for term in order]
        return all(name == "pk" or (name in fields and not fields[name].null) for name in names)

    def _claim_in_one_statement(
        self, token: str, until: datetime.datetime, size: int, read_bytes: int, stand_ins: dict[Any, Any]
    ) -> "Claim":
        """``claim_and_read`` on PostgreSQL, in one round trip: ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
        SKIP LOCKED) RETURNING``, in autocommit, where a transaction would cost BEGIN, SELECT, UPDATE and COMMIT.

        This is the first thing ``runmailer_pg`` does when a message is
        queued, so it counts in how soon the message goes out. RETURNING
        keeps no order: the rows come back with the columns they are ordered
        by, and are sorted here.
        """
        connection = connections[self.db]
        try:
            statement, params = self._claim_statement(size, stand_ins)
        except EmptyResultSet:  # a filter that matches nothing (``pk__in=[]``): the ORM would not ask either
            return Claim([])
        model = self.model
        until_value = model._meta.get_field("claimed_until").get_db_prep_save(until, connection)  # type: ignore[union-attr]
        far_future = datetime_now() + SENT_MARK_HOLDS / 2  # as ``sent_but_not_recorded`` finds them
        real = {**stand_ins, _CLAIM_TOKEN: token, _CLAIM_UNTIL: until_value, _CLAIM_FAR_FUTURE: far_future}
        # Rows longer than this come back without their data (NULL: message_data never is), to be read later.
        real[_CLAIM_READ_UP_TO] = read_bytes // max(size, 1)
        with connection.cursor() as cursor:
            cursor.execute(statement, [_replaced(value, real) for value in params])
            rows = cursor.fetchall()
        terms = [str(term) for term in self.query.order_by]
        for place in reversed(range(len(terms))):  # stable sorts, the last key first
            rows.sort(key=lambda row: row[2 + place], reverse=terms[place].startswith("-"))
        if not rows:
            return Claim([])
        fields, table = model._meta.concrete_fields, model._meta.db_table
        converters = [
            (position, [*connection.ops.get_db_converters(field.get_col(table)), *field.get_db_converters(connection)])
            for position, field in enumerate(fields)
        ]
        first = 2 + len(terms)
        names = [field.attname for field in fields]
        data_at = names.index("message_data")
        messages = {}
        for row in rows:
            values = list(row[first : first + len(fields)])
            if values[data_at] is None:
                continue  # too long to come with the claim
            for position, functions in converters:
                for convert in functions:
                    values[position] = convert(values[position], fields[position], connection)
            messages[row[0]] = model.from_db(self.db, names, values)
        return Claim(
            [(row[0], row[1]) for row in rows],
            messages,
            dont_send_list_empty=not rows[0][-2],
            sent_unrecorded=bool(rows[0][-1]),
        )

    def _claim_statement(self, size: int, stand_ins: dict[Any, Any]) -> tuple[str, list[Any]]:
        """The SQL of ``_claim_in_one_statement`` and its parameters, some of them stand-ins (``_replaced``).

        With ``stand_ins`` it is compiled once for each ``size`` and kept on
        this queryset: building and compiling the query costs more than
        running it.
        """
        kept: dict[int, tuple[str, list[Any]]] = self.__dict__.setdefault("_claim_statements", {})
        if stand_ins and size in kept:
            return kept[size]
        connection = connections[self.db]
        quote = connection.ops.quote_name
        model = self.model
        table = quote(model._meta.db_table)
        picked_sql, picked_params = self.values("pk")[:size].query.get_compiler(using=self.db).as_sql()
        if stand_ins and sum(1 for value in picked_params if _stands_in(value, stand_ins)) != len(stand_ins):
            raise StandInsNotFound("each stand-in value must appear once in the claimed messages' filters")
        terms = [str(term).lstrip("-") for term in self.query.order_by]
        ordered_by = ", ".join(quote(_column(model, term)) for term in terms)
        data = quote(_column(model, "message_data"))
        columns = ", ".join(
            f"CASE WHEN LENGTH({data}) <= %s THEN {data} END"
            if field.attname == "message_data"
            else quote(str(field.column))
            for field in model._meta.concrete_fields
        )
        listed = quote(DontSendEntry._meta.db_table)
        claimed_by, claimed_until = quote(_column(model, "claimed_by")), quote(_column(model, "claimed_until"))
        # Names from the models, quoted; every value is a parameter.
        statement = (
            f"UPDATE {table} "  # noqa: S608
            f"SET {claimed_by} = %s, {claimed_until} = %s "
            f"WHERE {quote(_column(model, 'pk'))} IN ({picked_sql} FOR UPDATE SKIP LOCKED) "
            f"RETURNING {quote(_column(model, 'pk'))}, LENGTH({data}), {ordered_by}, {columns}, "
            f"EXISTS (SELECT 1 FROM {listed}), "
            f"EXISTS (SELECT 1 FROM {table} WHERE {claimed_until} > %s AND {claimed_by} LIKE %s)"
        )
        params = [
            _CLAIM_TOKEN,
            _CLAIM_UNTIL,
            *picked_params,
            _CLAIM_READ_UP_TO,
            _CLAIM_FAR_FUTURE,
            SENT_MARK.replace("%", "\\%").replace("_", "\\_") + "%",
        ]
        if stand_ins:
            kept[size] = (statement, params)
        return statement, params

    def claim(self, pk: int, token: str, until: datetime.datetime) -> bool:
        """Take message ``pk`` for the pass ``token`` until ``until``; return whether it was free.

        One conditional UPDATE: the database lets exactly one of several
        workers racing for the same row succeed, on every vendor.
        """
        now = datetime_now()
        updated: int = (
            self.filter(pk=pk).claimable(now).exclude(claimed_by=token).update(claimed_by=token, claimed_until=until)
        )
        return updated == 1

    def insert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert new messages, given as the values of their fields by attribute name (``Message.row_for``),
        one INSERT for as many as the database takes in one statement.

        ``bulk_create`` without making a model instance for each row, nor
        the ORM's compiling: both cost more than the database's work. The
        statement is written from the model's fields (``_insert_into``).
        Like ``bulk_create``, no signals are sent; unlike it, the primary
        keys are not read back. Callers make it atomic.
        """
        connection = connections[self.db]
        columns = _written_columns(self.model, rows)
        insert = _insert_into(self.model, columns, connection)
        size = max(1, connection.ops.bulk_batch_size([column.field for column in columns], rows))
        with connection.cursor() as cursor:
            for start in range(0, len(rows), size):
                batch = rows[start : start + size]
                values = _row_values(columns, batch, connection)
                cursor.execute(f"{insert} {_values_clause(columns, len(batch))}", values)


class StandInsNotFound(ValueError):
    """The query compiled with stand-in values does not show each of them once: it cannot be reused."""


@dataclasses.dataclass
class Claim:
    """What a claim took: the ids of the messages with the length of their data, in sending order; on
    PostgreSQL also (``claim_and_read``) the rows that came back with it and what it learned on the way.
    """

    taken: list[tuple[int, int]]
    messages: dict[int, "Message"] = dataclasses.field(default_factory=dict)
    dont_send_list_empty: bool = False  # True: known to be empty when the messages were claimed
    sent_unrecorded: bool | None = None  # whether messages wait to be recorded (None: not known)


class _ClaimValue:
    """A parameter of the claim statement that is put in at each claim."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_CLAIM_TOKEN = _ClaimValue("token")
_CLAIM_UNTIL = _ClaimValue("until")
_CLAIM_READ_UP_TO = _ClaimValue("read up to")
_CLAIM_FAR_FUTURE = _ClaimValue("far future")


def _stands_in(value: Any, stand_ins: dict[Any, Any]) -> bool:
    try:
        return value in stand_ins
    except TypeError:  # not hashable
        return False


def _replaced(value: Any, real: dict[Any, Any]) -> Any:
    """``value``, or what it stands for in ``real``."""
    if isinstance(value, _ClaimValue):
        return real[value]
    return real[value] if _stands_in(value, real) else value


MessageManager = models.Manager.from_queryset(MessageQuerySet)


class Message(models.Model):
    """An email waiting in the queue."""

    message_data = models.TextField()
    when_added = models.DateTimeField(default=datetime_now)
    priority = models.PositiveSmallIntegerField(choices=PRIORITIES, default=PRIORITY_MEDIUM)
    retry_count = models.IntegerField(default=0)
    # Which sending pass holds the message, and until when. A pass that dies
    # leaves a claim that lapses by itself, so nothing waits for a cleanup.
    claimed_by = models.CharField(max_length=64, null=True, blank=True, editable=False)
    claimed_until = models.DateTimeField(null=True, blank=True, editable=False)
    # After a temporary failure, with automatic retries on: not before then.
    retry_after = models.DateTimeField(null=True, blank=True, editable=False)
    # The mail server refused it for good; ``retry_deferred`` leaves it alone.
    failed_permanently = models.BooleanField(default=False, db_default=False, editable=False)
    # Copies of what is inside message_data, so that the admin and plain SQL
    # can search and filter; derived from it whenever it is saved (``save``).
    # Their database default lets a django-mailer process still running
    # during an upgrade insert its four columns.
    # The subject's copy is ``subject_copy`` (column "subject"): ``subject``
    # is django-mailer's property, read from message_data.
    subject_copy = models.TextField(db_column="subject", blank=True, default="", db_default="", editable=False)
    from_email = models.TextField(blank=True, default="", db_default="", editable=False)
    recipients = models.TextField(blank=True, default="", db_default="", editable=False)
    message_id = models.TextField(null=True, editable=False)
    # The MAILERS entry (Django 6.1) the message was queued through, whose
    # deliver_using sends it; None: the default route (and every message
    # queued before this column, or on a site without MAILERS).
    mailer_alias = models.CharField(max_length=100, null=True, blank=True, editable=False)

    objects = MessageManager()

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        indexes = [
            # The sending order: a pass claims the first due messages without sorting the queue.
            models.Index(fields=["priority", "when_added", "id"], name="mailer_message_sending_order"),
            # The messages a pass has just claimed (SQLite claims with one UPDATE, then reads them back),
            # and those sent but not recorded (their claims run for a century). Only claimed messages are
            # in it, so queueing one writes no entry here (MariaDB and MySQL, which have no partial indexes,
            # get it whole: see ``check``).
            models.Index(
                fields=["claimed_until"],
                name="mailer_message_claims",
                condition=models.Q(claimed_until__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        if not keeps_message_data():  # the admin's own history keeps this text
            return f"Message {self.pk} {self.message_id or ''}".rstrip()
        try:
            email = self.email
            if not isinstance(email, EmailMessage):
                return "<Message repr unavailable>"
            return f'On {self.when_added}, "{email.subject}" to {", ".join(map(str, email.to))}'
        except Exception:  # str() serves logs and the admin: it must not raise, whatever the row holds
            return "<Message repr unavailable>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save the row; whenever ``message_data`` is written, its search columns are written from it.

        So the columns never disagree with the message, however the row was
        made (``Message.objects.create(message_data=...)``, the ``email``
        setter, a row of django-mailer saved again).
        """
        update_fields = kwargs.get("update_fields")
        # A deferred field is one missing from __dict__ (``get_deferred_fields``): reading the
        # attribute would load it.
        data = self.__dict__.get("message_data", _NOT_LOADED)
        writes_data = data is not _NOT_LOADED and (update_fields is None or "message_data" in update_fields)
        if writes_data:
            if getattr(self, "_columns_of", None) is not data:  # the setter has just written them
                self._set_search_columns(db_to_email(data))
            if update_fields is not None:
                kwargs["update_fields"] = {*update_fields, *SEARCH_COLUMNS}
        super().save(*args, **kwargs)
        if writes_data:
            self._row_data_hash = hash(data)

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any, **kwargs: Any) -> "Message":
        """A message read from the queue, which knows the data its row holds (``row_holds_its_data``).

        By a hash of it: a reference would keep a large message's data in
        memory after the engine lets go of it.
        """
        message = super().from_db(db, field_names, values, **kwargs)
        data = message.__dict__.get("message_data", _NOT_LOADED)
        if data is not _NOT_LOADED:
            message._row_data_hash = hash(data)
        return message

    @classmethod
    def check(cls, **kwargs: Any) -> list[Any]:
        """Django's checks, without its warning (models.W037) that MariaDB and MySQL have no partial indexes.

        There the index of claims is made whole, which serves the same
        queries at a little more cost: a warning on every ``migrate`` would
        tell the site nothing it can act on.
        """
        return [problem for problem in super().check(**kwargs) if problem.id != "models.W037"]

    @classmethod
    def for_email(
        cls, email: EmailMessage, priority: int | str | None = None, *, suppressed: set[str] | None = None
    ) -> "Message":
        """Return an unsaved ``Message`` queueing ``email`` (see ``row_for``)."""
        message = cls(**cls.row_for(email, priority, suppressed=suppressed))
        message._columns_of = message.message_data  # the copies are those of this data: save() need not redo them
        return message

    @classmethod
    def row_for(
        cls,
        email: EmailMessage,
        priority: int | str | None = None,
        *,
        suppressed: set[str] | None = None,
        alias: str | None = None,
    ) -> dict[str, Any]:
        """Return the values, by attribute name, of the row queueing ``email``; the fields not named take
        their defaults. Queueing many messages writes these rows without making a model instance of each.

        This is the one way into the queue: it checks every address as the
        delivering backend will (``InvalidAddress``, naming the field), drops
        recipients on the don't-send list, gives the email its Message-ID,
        and makes sure Django can render it, so that a malformed message
        fails here, in the caller, rather than later in the sending job.
        A plain email is known to render from its fields (``is_plain``);
        any other is rendered once. ``email`` itself is left as it was:
        callers reuse emails and header dicts, and each queued copy needs
        its own Message-ID.

        ``suppressed``, the listed addresses among its recipients, saves the
        don't-send query when the caller made one for many emails at once
        (``DontSendEntry.objects.suppressed_addresses``). ``alias`` is the
        ``MAILERS`` entry it is queued through.
        """
        check_addresses(email)
        email = _copy_of(email)
        if not isinstance(email.subject, str):
            email.subject = str(email.subject)  # as Django writes it out (None: "None")
        DontSendEntry.objects.remove_suppressed_recipients(email, suppressed)
        plain = is_plain(email)  # before the Message-ID is set: only one the caller gives is looked at
        ensure_message_id(email)
        data = email_to_db(email)  # first: it refuses what would take Django minutes to render
        if not plain:
            _check_sendable(email, data)
        return {
            "message_data": data,
            **search_columns(email),
            "priority": get_priority(priority),
            "mailer_alias": alias,
        }

    @classmethod
    def queue(cls, email: EmailMessage, priority: int | str | None = None, *, alias: str | None = None) -> str | None:
        """Queue ``email`` through the ``MAILERS`` entry ``alias``; return the database alias it was written to,
        or None when it has no recipients (nothing is queued).

        This is what a web page sending mail waits for, so the usual case is
        one statement: the INSERT checks the don't-send list itself
        (``insert_unless_listed``). When a recipient is listed, or the site
        listens to the saving of messages, it takes the long way: the list
        is read, the listed recipients dropped, and the row saved by the ORM.
        """
        if not _saves_heard():
            row = cls.row_for(email, priority, suppressed=set(), alias=alias)  # as if no one were listed: see below
            if not email.recipients():
                return None
            # A site's routers are given the instance, as save() gives it (and django-mailer 2.3.2 saved each
            # message); made only for them, as making it costs a tenth of queueing.
            hints = {"instance": cls(**row)} if router.routers else {}
            using = router.db_for_write(cls, **hints)
            if _checks_list_in_insert(using) and insert_unless_listed(using, row, email.recipients()):
                return using
        message = cls.for_email(email, priority)
        if not email.recipients():
            return None
        message.mailer_alias = alias
        message.save()
        return message._state.db

    def _set_search_columns(self, email: Any) -> None:
        for column, column_value in search_columns(email).items():
            setattr(self, column, column_value)
        self._columns_of = self.message_data

    def defer(self, reason: str | None = None) -> None:
        """Move the message aside until ``retry_deferred``, and release it; with a ``reason``, log the failure."""
        self.priority = PRIORITY_DEFERRED
        self._change_state(["priority"], reason)

    def fail_permanently(self, reason: str) -> None:
        """Set the message aside for good, for a human to read and perhaps requeue, and log why."""
        self.priority = PRIORITY_DEFERRED
        self.failed_permanently = True
        self._change_state(["priority", "failed_permanently"], reason)

    def retry_later(self, reason: str, when: datetime.datetime) -> None:
        """Keep the message in the queue but send it no sooner than ``when``, and log why."""
        self.retry_after = when
        self.retry_count += 1
        self._change_state(["retry_after", "retry_count"], reason)

    def record(self, result: str, log_message: str = "") -> None:
        """Log the final outcome of the message and take it off the queue, together."""
        type(self).record_together([(self, log_message)], result)

    @classmethod
    def record_together(cls, outcomes: Sequence[tuple["Message", str]], result: str, *, again: bool = False) -> None:
        """Log the outcome of several messages and take them off the queue, all in one transaction.

        This is what a drain does for every message it sends, so it is kept
        cheap: one INSERT and one DELETE, or on PostgreSQL a single statement
        (see ``MessageLogManager.log_and_delete``). Where the site listens to
        the signals of these rows, each is saved and deleted through the ORM
        instead, so that its receivers run. If the log rows cannot hold the
        copies of one of them, each is recorded on its own, and the one that
        cannot is written without them.

        ``again``: a record of these made before may have been committed (its
        reply was lost); only the messages still queued are then logged, so
        that none is logged twice (see ``log_and_delete``).
        """
        for message, _note in outcomes:
            message._read_data_first()
        if not row_signals_heard():
            using = outcomes[0][0]._state.db or router.db_for_write(cls)
            rows = [MessageLog.objects.row_for(message, result, note) for message, note in outcomes]
            try:
                pks = [message.pk for message, _note in outcomes]
                MessageLog.objects.db_manager(using).log_and_delete(rows, pks, again=again)
                return
            except DatabaseError as exc:
                if not cannot_hold(exc):
                    raise
                # One of them cannot be written as it is: each on its own, below.
        for message, note in outcomes:
            message._change_with_log_row(message.delete, result, note)

    def recording_statement(self, result: str, log_message: str, connection: Any) -> "RecordingStatement | None":
        """The one statement that logs this message's outcome and takes it off the queue, for ``connection``
        (PostgreSQL's, outside a transaction) to run; None when the site listens to the signals of these
        rows, as then the ORM must do it (``record``).

        While its row holds what the message holds (``row_holds_its_data``),
        the server copies the log row from the row it deletes: the message
        is not sent back to it (``copy_and_delete_statement``).
        """
        if row_signals_heard():
            return None
        if self.message_id and self.row_holds_its_data():  # (no Message-ID to copy: it is read from the data)
            sql, params = MessageLog.objects.copy_and_delete_statement(self, result, log_message, connection)
            return RecordingStatement(sql, params, from_queue_row=True)
        self._read_data_first()
        row = MessageLog.objects.row_for(self, result, log_message)
        sql, params = MessageLog.objects.log_and_delete_statement([row], [self.pk], connection)
        return RecordingStatement(sql, params, from_queue_row=False)

    def row_holds_its_data(self) -> bool:
        """Whether the message's row holds the data the message holds: the data it was read or saved with.

        (Also when the message holds none, as the engine lets go of a large
        message's data while it is sent: the row still holds it.)
        """
        known = getattr(self, "_row_data_hash", None)
        if known is None:
            return False
        data = self.__dict__.get("message_data", _NOT_LOADED)
        return data is _NOT_LOADED or hash(data) == known

    def _read_data_first(self) -> None:
        if "message_data" in self.get_deferred_fields():
            # Read it before the transaction, which must begin by writing: SQLite
            # cannot turn a reading transaction into a writing one while another
            # process writes ("database is locked").
            try:
                self.refresh_from_db(fields=["message_data"])
            except Message.DoesNotExist:
                # Its row is gone: deleted while the message was being sent, or taken off the queue by a
                # record whose reply was lost. Logged, if at all, with its copies but without its data.
                self.message_data = None  # type: ignore[assignment]  # the log row's NULL

    def _change_state(self, fields: list[str], reason: str | None) -> None:
        self.claimed_until = None
        if reason is None:
            self.save(update_fields=[*fields, "claimed_until"])
            return
        self._change_with_log_row(lambda: self.save(update_fields=[*fields, "claimed_until"]), RESULT_FAILURE, reason)

    def _change_with_log_row(self, change: Callable[[], Any], result: str, log_message: str) -> None:
        """Write the log row and make ``change``, in one transaction.

        If the log row cannot hold the copies of this message (a MySQL table
        whose character set cannot store its subject, a date that SQLite
        cannot read back), it is written without them: otherwise the change
        could never be made, and the message would stop every pass.
        """
        pk = self.pk
        try:
            try:
                with transaction.atomic(using=self._state.db):
                    MessageLog.objects.log(self, result, log_message=log_message)
                    change()
            except DatabaseError as exc:
                if not cannot_hold(exc):
                    raise
                self.pk = pk
                logger.warning("the log row of message %s is written without its copies: %s", pk, exc)
                with transaction.atomic(using=self._state.db):
                    MessageLog.objects.log_without_copies(self, result, f"{log_message} [{type(exc).__name__}: {exc}]")
                    change()
        except BaseException:
            # delete() forgets the pk at once, even when the commit then fails:
            # the row is still there, and a second try must find it.
            self.pk = pk
            raise

    @property
    def email(self) -> Any:
        """The stored ``EmailMessage``, or None if it cannot be decoded.

        Mutating the returned object does not change the row: assign it back.
        """
        return db_to_email(self.message_data)

    @email.setter
    def email(self, value: Any) -> None:
        self.message_data = email_to_db(value)
        self._set_search_columns(value)

    @property
    def to_addresses(self) -> list[str]:
        """The ``to`` of the stored email, as django-mailer had it: [] when it cannot be decoded."""
        email = self.email
        return email.to if email is not None else []

    @property
    def subject(self) -> str:
        """The subject of the stored email, as django-mailer had it: "" when it cannot be decoded.

        Read from ``message_data`` each time, so it follows a change to it at
        once; ``subject_copy`` is the searchable column, written on ``save``.
        """
        email = self.email
        return email.subject if email is not None else ""


_NOT_LOADED = object()

# The statement of ``copy_and_delete_statement`` by the kind of database and whether message data is kept.
_COPIES_AND_DELETES: dict[tuple[Any, bool], str] = {}


class RecordingStatement(NamedTuple):
    """The statement recording one sent message (``Message.recording_statement``), and its parameters."""

    sql: str
    params: list[Any]
    # The log row is copied from the message's queue row: none is written if the row is gone.
    from_queue_row: bool


def _check_sendable(email: EmailMessage, data: str) -> None:
    """Render ``email`` as the SMTP backend will, then read back ``data``, the row that stores it, as the sending
    job will: what either would refuse is refused now, in the caller, rather than deferred for good later. What
    Django raises reaches the caller; what the job would refuse raises ``UnstorableEmail``.
    """
    try:
        email.message().as_bytes()  # its headers are folded only then
    except RecursionError as exc:  # Python's stack, not Django's verdict
        raise UnstorableEmail("the message nests too deep to be rendered") from exc
    try:
        decode(data)
    except UndecodableData as exc:
        raise UnstorableEmail(f"{exc}: the sending job could not read it back") from exc


def _copy_of(email: EmailMessage) -> EmailMessage:
    """Return a shallow copy of ``email`` with its own dict of extra headers.

    Django's own classes are copied attribute by attribute, five times
    faster than ``copy.copy``; a subclass may define how it is copied.
    """
    if type(email) is EmailMessage or type(email) is EmailMultiAlternatives:
        copied = object.__new__(type(email))
        copied.__dict__.update(email.__dict__)
    else:
        copied = copy.copy(email)
    copied.extra_headers = dict(email.extra_headers or {})
    return copied


def make_message(
    subject: str = "",
    body: str = "",
    from_email: str | None = None,
    to: Sequence[str] | None = None,
    bcc: Sequence[str] | None = None,
    attachments: list[Any] | None = None,
    headers: dict[str, str] | None = None,
    priority: int | str | None = None,
) -> Message:
    """Return an unsaved ``Message`` for a plain email; call ``save()`` to queue it.

    Recipients on the don't-send list are dropped. To queue a richer email,
    assign any ``EmailMessage`` to the result's ``email`` attribute.
    """
    email = EmailMessage(
        subject=subject,
        body=body,
        from_email=from_email,
        to=to,
        bcc=bcc,
        attachments=attachments,
        headers=headers,
    )
    return Message.for_email(email, priority=priority)


class DontSendEntryManager(models.Manager["DontSendEntry"]):
    def listed(self, address: str) -> "models.QuerySet[DontSendEntry]":
        """The entries for ``address``, in whatever case they were written."""
        return self.annotate(address_lower=Lower("to_address")).filter(address_lower=address.lower())

    def add_addresses(self, addresses: Iterable[str]) -> list[str]:
        """Put the bare addresses of ``addresses`` on the list; return those that were not on it already."""
        wanted = {bare_address(address).lower() for address in addresses}
        wanted = {address for address in wanted if address and is_utf8(address)}
        added = []
        for address in sorted(wanted - self.suppressed_addresses(wanted)):
            try:
                with transaction.atomic(using=self.db):
                    self.create(to_address=address, when_added=datetime_now())
            except IntegrityError:  # added by someone else in between
                continue
            added.append(address)
        return added

    def has_address(self, address: str) -> bool:
        """Return whether ``address`` is on the don't-send list (case-insensitive)."""
        return bool(self.suppressed_addresses([address]))

    def suppressed_addresses(self, recipients: Iterable[str]) -> set[str]:
        """Return the bare, lower-cased addresses of ``recipients`` that are on the list, in one query.

        (One per ``max_query_params`` addresses where the database limits
        them: 999 with SQLite before Django 6.1.) The query is written out
        rather than built by the ORM, which would cost more than the INSERT
        that queues a message; it is the ORM's
        ``annotate(address=Lower("to_address")).filter(address__in=...)``.
        """
        # One that UTF-8 cannot carry (a lone surrogate, from a damaged row) cannot be on the
        # list, and no database would take it as a parameter.
        addresses = sorted({address for address in map(bare_address, recipients) if is_utf8(address)})
        if not addresses:
            return set()
        connection = connections[self.db]
        size = connection.features.max_query_params or len(addresses)
        found: set[str] = set()
        with connection.cursor() as cursor:
            for start in range(0, len(addresses), size):
                chunk = addresses[start : start + size]
                cursor.execute(_listed_among(connection, len(chunk)), chunk)
                found.update(address for (address,) in cursor.fetchall())
        return found

    def remove_suppressed_recipients(self, email: EmailMessage, suppressed: set[str] | None = None) -> list[str]:
        """Drop the recipients of ``email`` that are on the list; return those dropped.

        ``suppressed``, the listed addresses among these and perhaps other
        recipients (``suppressed_addresses``), saves the query when one was
        made for many emails at once. When every recipient is on the list
        nothing is dropped: the message stays whole so that the engine logs
        it as "don't send", with the addresses it kept away.
        """
        if suppressed is None:
            suppressed = self.suppressed_addresses(email.recipients())
        if not suppressed:
            return []
        removed = [r for r in email.recipients() if bare_address(r) in suppressed]
        kept = [r for r in email.recipients() if bare_address(r) not in suppressed]
        if kept and removed:
            email.to = [r for r in email.to if bare_address(r) not in suppressed]
            email.cc = [r for r in email.cc if bare_address(r) not in suppressed]
            email.bcc = [r for r in email.bcc if bare_address(r) not in suppressed]
            logger.info("skipping %d recipient(s) on the don't send list", len(removed))
        return removed


class DuplicateAddress(IntegrityError):
    """The address is already on the don't-send list, perhaps written in another case."""


class DontSendEntry(models.Model):
    """An address that must never receive mail from this site.

    Each address is listed once, whatever its case: a unique constraint on
    ``LOWER(to_address)`` where the database can index an expression
    (SQLite, PostgreSQL, MySQL 8), and ``save`` looks first on every
    database (MariaDB cannot index an expression; there two sessions adding
    the same address at the same moment could both succeed, which the
    lookup, case-insensitive, does not mind).
    """

    to_address = models.EmailField(max_length=254)
    when_added = models.DateTimeField()

    objects = DontSendEntryManager()

    class Meta:
        verbose_name = _("don't send entry")
        verbose_name_plural = _("don't send entries")
        constraints = [
            models.UniqueConstraint(
                Lower("to_address"),
                name="mailer_dontsendentry_address_unique",
                violation_error_message=_("This address is already on the don't send list."),
            ),
        ]

    def __str__(self) -> str:
        return self.to_address

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save the entry, lower-cased; raise ``DuplicateAddress`` if its address is listed already, in any case.

        Stored lower-cased, an address matches on every database: SQLite's
        LOWER() leaves non-ASCII capitals as they are.
        """
        given, self.to_address = self.to_address, self.to_address.lower()
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        listed = type(self)._default_manager.db_manager(using).listed(self.to_address).exclude(pk=self.pk)
        if listed.exists():
            raise DuplicateAddress(gettext("%(address)s is already on the don't send list.") % {"address": given})
        super().save(*args, **kwargs)

    def clean(self) -> None:
        # Lower-cased before the admin's form checks the constraint, as save() stores it.
        super().clean()
        self.to_address = self.to_address.lower()

    @classmethod
    def check(cls, **kwargs: Any) -> list[Any]:
        """Django's checks, without its warning (models.W044) that MariaDB cannot have the constraint.

        There ``save`` and the admin's form (which validates constraints
        itself) keep the list unique instead; a warning on every ``migrate``
        would tell the site nothing it can act on.
        """
        return [problem for problem in super().check(**kwargs) if problem.id != "models.W044"]


# MySQL and MariaDB report a value a column cannot hold (a character its character set lacks, a string too
# long) as an OperationalError, which Django passes on as it is: errors about the data, not the database.
MYSQL_DATA_ERRORS = {1267, 1300, 1366, 1406}


def cannot_hold(exc: DatabaseError) -> bool:
    """Whether ``exc`` says a row cannot hold these values (rather than that the database is in trouble)."""
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    code = exc.args[0] if exc.args else None
    return isinstance(exc, OperationalError) and code in MYSQL_DATA_ERRORS


def _column(model: type[models.Model], name: str) -> str:
    """The column of ``model``'s field ``name`` ("pk": its primary key)."""
    field = model._meta.pk if name == "pk" else model._meta.get_field(name)
    return str(field.column)  # type: ignore[union-attr]


def _listed_among(connection: Any, count: int) -> str:
    """The query of the don't-send entries (their addresses lower-cased) among ``count`` parameters: bare,
    lower-cased addresses. With none, a query that finds nothing.
    """
    quote = connection.ops.quote_name
    column = f"LOWER({quote(_column(DontSendEntry, 'to_address'))})"
    table = quote(DontSendEntry._meta.db_table)
    if not count:
        return f"SELECT {column} FROM {table} WHERE 1 = 0"  # noqa: S608
    # Only quoted names of this model are written in; the addresses are parameters.
    return f"SELECT {column} FROM {table} WHERE {column} IN ({', '.join(['%s'] * count)})"  # noqa: S608


@dataclasses.dataclass(frozen=True, eq=False)
class _Column:
    """A field an INSERT may write, with what writing it needs to know, worked out once per model.

    Compared and hashed by identity (there is one of each per field), so
    that tuples of them are cheap keys of the statements written for them.
    """

    field: Any
    name: str  # the field's attribute name: its key in a row
    null_unless_given: bool  # the database writes NULL here when the INSERT leaves it out, as the ORM would
    as_is: type | None  # the type whose values every database mailer supports stores as they are: no preparing


# Values of these types are stored as they are by every database mailer supports, whatever field they are for.
_AS_IS = {
    "TextField": str,
    "CharField": str,
    "IntegerField": int,
    "PositiveSmallIntegerField": int,
    "BooleanField": bool,
}


@functools.cache
def _inserted_columns(model: type[models.Model]) -> tuple[_Column, ...]:
    """The fields of ``model`` that an INSERT may write: every concrete one but the primary key."""
    return tuple(
        _Column(
            field=field,
            name=field.attname,
            null_unless_given=bool(field.null) and not field.has_default() and not field.has_db_default(),
            as_is=_AS_IS.get(field.get_internal_type()),
        )
        for field in model._meta.concrete_fields
        if not field.primary_key
    )


def _written_columns(model: type[models.Model], rows: Sequence[dict[str, Any]]) -> tuple[_Column, ...]:
    """The columns of ``model`` that an INSERT of the new ``rows`` names: all but those left NULL in every row.

    Leaving those to the database saves passing a NULL for each, which
    costs PostgreSQL's client-side binding more than a message's text does.
    """
    if len(rows) == 1:  # queueing one message: the usual case, worth its own line
        return tuple(
            column
            for column in _inserted_columns(model)
            if not column.null_unless_given or rows[0].get(column.name) is not None
        )
    return tuple(
        column
        for column in _inserted_columns(model)
        if not column.null_unless_given or any(row.get(column.name) is not None for row in rows)
    )


# "INSERT INTO table (columns)" by model, columns and the kind of database it is quoted for (``_insert_into``).
_INSERTS_INTO: dict[tuple[Any, ...], str] = {}


def _insert_into(model: type[models.Model], columns: tuple[_Column, ...], connection: Any) -> str:
    """``INSERT INTO`` the table of ``model`` its ``columns``, quoted for ``connection``.

    Written once for each kind of database: quoting the names costs as much
    as the rest of an INSERT's preparing.
    """
    key = (model, columns, type(connection.ops))
    if key not in _INSERTS_INTO:
        quote = connection.ops.quote_name
        # Names from the model, quoted; every value is a parameter.
        names = ", ".join(quote(str(column.field.column)) for column in columns)
        _INSERTS_INTO[key] = f"INSERT INTO {quote(model._meta.db_table)} ({names})"
    return _INSERTS_INTO[key]


def _values_clause(columns: tuple[_Column, ...], rows: int) -> str:
    """``VALUES`` with a parameter for each of ``columns`` in each of ``rows`` rows."""
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return f"VALUES {', '.join([row] * rows)}"


def _row_values(columns: tuple[_Column, ...], rows: Sequence[dict[str, Any]], connection: Any) -> list[Any]:
    """The parameters for ``columns`` of the new ``rows``, given as the values of their fields by attribute
    name (a field not named takes its default), as the ORM would prepare them.

    NULL, text, whole numbers and booleans are passed as they are: the ORM's
    preparing them, field by field, costs queueing a message more than its
    INSERT does. A default is taken once for all the rows, as one statement
    writes them: they were added at the same time.
    """
    defaults: dict[str, Any] = {}
    values = []
    for row in rows:
        for column in columns:
            if column.name not in row:
                if column.name not in defaults:
                    defaults[column.name] = _prepared(column, column.field.get_default(), connection)
                values.append(defaults[column.name])
                continue
            values.append(_prepared(column, row[column.name], connection))
    return values


def _prepared(column: _Column, value: Any, connection: Any) -> Any:
    """``value`` for ``column`` as the ORM would pass it to the database."""
    if value is None or type(value) is column.as_is:
        return value
    return column.field.get_db_prep_save(value, connection)


# The statements of ``insert_unless_listed`` by the columns written, the number of addresses looked up and the
# kind of database: writing one costs a web page queueing a message as much as its INSERT's other preparing.
# Kept for messages to a few addresses only (nearly every message), so that they stay few and short however
# many recipients a site's messages have.
_INSERTS_UNLESS_LISTED: dict[tuple[Any, ...], str] = {}
_KEPT_FOR_ADDRESSES = 20


def insert_unless_listed(using: str, row: dict[str, Any], recipients: Sequence[str]) -> bool:
    """Insert the new message ``row`` (``Message.row_for``) on the database ``using``, unless one of ``recipients``
    is on the don't-send list; return whether it was.

    One statement, ``INSERT ... SELECT ... WHERE NOT EXISTS``, in place of
    a query of the list followed by an INSERT: queueing one message, as
    a web page does, then costs little more than inserting its row. A
    function rather than a manager method: making a queryset costs a
    tenth of this. When it returns False nothing was written, and the
    caller takes the long way (``Message.for_email`` reads the list and
    drops the listed).
    """
    connection = connections[using]
    addresses = sorted({address for address in map(bare_address, recipients) if is_utf8(address)})
    columns = _written_columns(Message, [row])
    values = _row_values(columns, [row], connection)
    limit = connection.features.max_query_params
    if limit is not None and len(values) + len(addresses) > limit:
        return False
    key = (columns, len(addresses), type(connection.ops))
    statement = _INSERTS_UNLESS_LISTED.get(key)
    if statement is None:
        select = ", ".join(["%s"] * len(values))
        listed = _listed_among(connection, len(addresses))
        statement = f"{_insert_into(Message, columns, connection)} SELECT {select} WHERE NOT EXISTS ({listed})"
        if len(addresses) <= _KEPT_FOR_ADDRESSES:
            _INSERTS_UNLESS_LISTED[key] = statement
    # As the ORM's save: an error marks the caller's atomic block for rollback.
    with transaction.mark_for_rollback_on_error(using), connection.cursor() as cursor:
        cursor.execute(statement, [*values, *addresses])
        inserted: int = cursor.rowcount
    return inserted == 1


def _checks_list_in_insert(using: str) -> bool:
    """Whether the INSERT queueing a message on ``using`` may read the don't-send list itself.

    Only where the list is read from that same database (a router may keep
    it elsewhere: the list would be looked up in a copy that is empty, or
    missing), and where the read takes no locks: MySQL and MariaDB, under
    REPEATABLE READ or SERIALIZABLE, lock every entry an ``INSERT ...
    SELECT`` scans (every entry: ``LOWER()`` has no index there), so that
    adding an address would wait for each open transaction that queued
    mail, and two that do both deadlock. Django's own level, READ
    COMMITTED, reads without locking.
    """
    if router.db_for_read(DontSendEntry) != using:
        return False
    connection = connections[using]
    if connection.vendor != "mysql":
        return True
    level = connection.settings_dict.get("OPTIONS", {}).get("isolation_level", "read committed")
    return isinstance(level, str) and level.lower() in ("read committed", "read uncommitted")


def _saves_heard() -> bool:
    """Whether the site listens to messages being saved (then queueing saves them through the ORM)."""
    return models.signals.pre_save.has_listeners(Message) or models.signals.post_save.has_listeners(Message)


def row_signals_heard() -> bool:
    """Whether the site listens to messages being deleted or log rows being saved (then the ORM must record)."""
    return any(
        signal.has_listeners(sender)
        for signal, sender in (
            (models.signals.pre_delete, Message),
            (models.signals.post_delete, Message),
            (models.signals.pre_save, MessageLog),
            (models.signals.post_save, MessageLog),
        )
    )


def _ascii(text: str | None) -> str | None:
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "") if text else text


def _message_id_of(value: Any) -> str | None:
    """The Message-ID of a stored email; None for a row that holds something else (a plain value, nothing)."""
    return get_message_id(value) if isinstance(value, EmailMessage) else None


class MessageLogManager(models.Manager["MessageLog"]):
    def log(self, message: Message, result_code: str, log_message: str = "") -> "MessageLog":
        """Record one attempt to send ``message`` with its result.

        With ``MAILER_EMAIL_LOG_MESSAGE_DATA`` off, the row keeps no content:
        no message data, no subject, sender or recipients, and the
        recipients' addresses are blanked out of ``log_message`` (mail
        servers name them in their errors).
        """
        entry = self.entry(message, result_code, log_message)
        entry.save(force_insert=True, using=self.db)
        return entry

    def entry(self, message: Message, result_code: str, log_message: str = "") -> "MessageLog":
        """Return the unsaved row that ``log`` writes."""
        return self.model(**self.row_for(message, result_code, log_message))

    def row_for(self, message: Message, result_code: str, log_message: str = "") -> dict[str, Any]:
        """Return the values, by attribute name, of the log row of an attempt to send ``message``; the fields
        not named take their defaults. A drain writes these rows without making a model instance of each.
        """
        keep_data = keeps_message_data()
        return {
            "message_data": message.message_data if keep_data else None,
            "subject_copy": storable_text(message.subject_copy) if keep_data else None,
            "from_email": storable_text(message.from_email) if keep_data else None,
            "recipients": storable_text(message.recipients) if keep_data else None,
            "message_id": storable_text(message.message_id or _message_id_of(message.email)),
            "when_added": message.when_added or datetime_now(),
            "priority": message.priority,
            "result": result_code,
            "log_message": storable_text(loggable(log_message, message)) or "",
        }

    def log_and_delete(
        self, rows: Sequence[dict[str, Any]], message_pks: Sequence[int], *, again: bool = False
    ) -> None:
        """Insert the log ``rows`` (``row_for``) and delete the messages ``message_pks``, atomically.

        Without the ORM's compiling, which costs a drain more than the
        database does: the statements are written from the models' fields.
        On PostgreSQL, outside a transaction, one statement does both
        (``log_and_delete_statement``): atomic by itself, one round trip (a
        transaction would add BEGIN and COMMIT). Elsewhere both run in one
        transaction. No signals are sent (``Message.record_together``
        decides when that is fine). ``again``: a record of these made before
        may have been committed (its reply was lost), so only the messages
        still queued are logged.
        """
        connection = connections[self.db]
        if connection.vendor == "postgresql" and connection.get_autocommit():
            with connection.cursor() as cursor:
                cursor.execute(*self.log_and_delete_statement(rows, message_pks, connection, again=again))
            return
        with transaction.atomic(using=self.db), connection.cursor() as cursor:
            if again:
                # A record of these made before may have been committed, its reply lost: only the messages
                # this one takes off the queue are logged (each deleted on its own, to know which).
                taken = []
                for row, message_pk in zip(rows, message_pks, strict=True):
                    cursor.execute(self._delete([message_pk], connection), [message_pk])
                    if cursor.rowcount:
                        taken.append(row)
                rows, message_pks = taken, []
            if rows:
                columns = _written_columns(self.model, rows)
                insert = f"{_insert_into(self.model, columns, connection)} {_values_clause(columns, len(rows))}"
                cursor.execute(insert, _row_values(columns, rows, connection))
            if message_pks:
                cursor.execute(self._delete(message_pks, connection), list(message_pks))

    def log_and_delete_statement(
        self, rows: Sequence[dict[str, Any]], message_pks: Sequence[int], connection: Any, *, again: bool = False
    ) -> tuple[str, list[Any]]:
        """The one PostgreSQL statement, and its parameters, that does what ``log_and_delete`` does: the
        DELETE rides along in the INSERT's ``WITH``. ``connection`` (PostgreSQL's) runs it outside a transaction.

        ``again``: the record is made again, as the reply to the first one
        got lost, and that one may have been committed. Then each log row is
        written only if the DELETE took its message (``rows`` and
        ``message_pks`` go together, in order), so that none is logged twice.
        Not the first time: a message that went out is logged even if it left
        the queue meanwhile (deleted in the admin while it was being sent).
        """
        quote = connection.ops.quote_name
        pk = quote(_column(Message, "pk"))
        columns = _written_columns(self.model, rows)
        values = _row_values(columns, rows, connection)
        insert = _insert_into(self.model, columns, connection)
        delete = self._delete(message_pks, connection)
        if not again:
            return f"WITH taken AS ({delete}) {insert} {_values_clause(columns, len(rows))}", [*message_pks, *values]
        # Only quoted names of the models are written in; the values are parameters.
        row = f"SELECT {', '.join(['%s'] * len(columns))} FROM taken WHERE taken.{pk} = %s"  # noqa: S608
        statement = f"WITH taken AS ({delete} RETURNING {pk}) {insert} {' UNION ALL '.join([row] * len(rows))}"
        params: list[Any] = list(message_pks)
        for number, message_pk in enumerate(message_pks):
            params += [*values[number * len(columns) : (number + 1) * len(columns)], message_pk]
        return statement, params

    def copy_and_delete_statement(
        self, message: Message, result_code: str, log_message: str, connection: Any
    ) -> tuple[str, list[Any]]:
        """The one PostgreSQL statement, and its parameters, that logs ``message`` as ``log_and_delete_statement``
        does, with the copies (data, subject, addresses) its queue row holds, and deletes that row.

        For a message whose row holds its data (``Message.row_holds_its_data``): the server
        copies them from the row it deletes, so the message is not written
        out and sent back to it. The statement returns how many queue rows
        it took: if none (the row was deleted while the message was being
        sent), nothing is logged, and the caller logs it from what it holds.
        """
        quote = connection.ops.quote_name
        keep_data = keeps_message_data()
        key = (type(connection.ops), keep_data)
        if key not in _COPIES_AND_DELETES:
            copies = ["message_data", "subject_copy", "from_email", "recipients"] if keep_data else []
            copied = ["when_added", *copies]
            given = ["priority", "message_id", "result", "log_message", "when_attempted"]
            names = ", ".join(quote(_column(self.model, name)) for name in [*copied, *given])
            taken = ", ".join(f"taken.{quote(_column(Message, name))}" for name in copied)
            # Names from the models, quoted; every value is a parameter. The statement's result is the
            # number of queue rows it took (what the INSERT reports may be changed by triggers or rules).
            _COPIES_AND_DELETES[key] = (
                f"WITH taken AS ({self._delete([message.pk], connection)} RETURNING *), "  # noqa: S608
                f"logged AS (INSERT INTO {quote(self.model._meta.db_table)} ({names}) "
                f"SELECT {taken}, %s, %s, %s, %s, %s FROM taken) "
                "SELECT COUNT(*) FROM taken"
            )
        return _COPIES_AND_DELETES[key], [
            message.pk,
            message.priority,  # as it was sent: someone may defer the row meanwhile
            storable_text(message.message_id or _message_id_of(message.email)),
            result_code,
            storable_text(loggable(log_message, message)) or "",
            datetime_now(),  # when_attempted: PostgreSQL takes the time as it is
        ]

    def _delete(self, message_pks: Sequence[int], connection: Any) -> str:
        """The DELETE of the messages ``message_pks`` (its parameters: those)."""
        quote = connection.ops.quote_name
        return (
            f"DELETE FROM {quote(Message._meta.db_table)} "  # noqa: S608
            f"WHERE {quote(_column(Message, 'pk'))} IN ({', '.join(['%s'] * len(message_pks))})"
        )

    def log_without_copies(self, message: Message, result_code: str, log_message: str) -> "MessageLog":
        """Record an attempt with only what any column can hold: result, Message-ID, priority, the reason in ASCII."""
        return self.create(
            message_id=_ascii(message.message_id),
            when_added=datetime_now(),
            priority=message.priority if message.priority in PRIORITY_MAPPING.values() else PRIORITY_DEFERRED,
            result=result_code,
            log_message=_ascii(loggable(log_message, message)) or "",
        )

    def purge_old_entries(self, days: int, result_codes: Iterable[str] | None = None) -> int:
        """Delete the entries attempted more than ``days`` ago (successes by default); return how many."""
        if result_codes is None:
            result_codes = [RESULT_SUCCESS]
        try:
            limit = datetime_now() - datetime.timedelta(days=days)
        except OverflowError:  # further back than a date can go: no entry is that old
            return 0
        deleted, _per_model = self.filter(when_attempted__lt=limit, result__in=list(result_codes)).delete()
        return deleted


class MessageLog(models.Model):
    """The result of one attempt to send a message."""

    message_data = models.TextField(null=True)
    message_id = models.TextField(editable=False, null=True)
    when_added = models.DateTimeField(db_index=True)
    priority = models.PositiveSmallIntegerField(choices=PRIORITIES, db_index=True)
    when_attempted = models.DateTimeField(default=datetime_now)
    result = models.CharField(max_length=1, choices=RESULT_CODES)
    log_message = models.TextField()
    # Searchable copies, empty (None) when MAILER_EMAIL_LOG_MESSAGE_DATA is off; the subject's is
    # ``subject_copy`` (column "subject"), as on Message.
    subject_copy = models.TextField(db_column="subject", null=True, editable=False)
    from_email = models.TextField(null=True, editable=False)
    recipients = models.TextField(null=True, editable=False)

    objects = MessageLogManager()

    class Meta:
        verbose_name = _("message log")
        verbose_name_plural = _("message logs")
        indexes = [
            # purge_mail_log: the old rows of a result, without reading the whole log.
            models.Index(fields=["result", "when_attempted"], name="mailer_messagelog_purge"),
        ]

    def __str__(self) -> str:
        try:
            email = self.email
            if not isinstance(email, EmailMessage):
                return f'On {self.when_attempted}, "{self.message_id}"'
            return f'On {self.when_attempted}, "{email.subject}" to {", ".join(map(str, email.to))}'
        except Exception:  # str() serves logs and the admin: it must not raise, whatever the row holds
            return "<MessageLog repr unavailable>"

    @property
    def email(self) -> Any:
        return db_to_email(self.message_data)

    @property
    def to_addresses(self) -> list[str] | None:
        """The ``to`` of the logged email, as django-mailer had it: None when the row keeps no email."""
        email = self.email
        return email.to if email is not None else None

    @property
    def subject(self) -> str | None:
        """The subject of the logged email, as django-mailer had it: None when the row keeps no email.

        ``subject_copy`` is the searchable column.
        """
        email = self.email
        return email.subject if email is not None else None
