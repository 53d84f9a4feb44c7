"""The admin: the queue, the log and the don't-send list.

A stored message is shown decoded and escaped, never as its raw data, and
can't be edited: rows are data from outside (an old pickle, a forged row),
and the search columns must always describe what is stored. Its HTML part
is previewed only inside a sandboxed frame, from a page of its own whose
Content-Security-Policy lets no script run and nothing load from elsewhere.
Every action needs a permission (the change permission on messages; adding
to the don't-send list, the add permission on it) and reports what it did,
not what was selected.
"""

import logging
from collections.abc import Iterator
from email.message import Message as MIMEMessage
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db.models import Exists, OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.template.defaultfilters import linebreaksbr
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import content_disposition_header
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.timesince import timesince
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from mailer import engine
from mailer.codec import decode
from mailer.exceptions import UndecodableData
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
    MessageQuerySet,
)

logger = logging.getLogger(__name__)

# The page that shows an HTML part: no script, no request anywhere (not even for an image: a
# remote image tells the sender the message was read), inline styles and embedded images only.
# ``sandbox`` also keeps the page in an origin of its own when it is opened outside the frame.
PREVIEW_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


class StoredEmailDisplay:
    """Read-only fields that show the email a row stores: headers, text body, alternatives, attachments."""

    def _email(self, instance: Message | MessageLog) -> tuple[Any, str]:
        """Return the stored email and, when it cannot be read, why; read once per page."""
        if "_decoded_for_admin" not in instance.__dict__:
            try:
                instance.__dict__["_decoded_for_admin"] = (decode(instance.message_data), "")
            except UndecodableData as exc:
                instance.__dict__["_decoded_for_admin"] = (None, str(exc))
        decoded: tuple[Any, str] = instance.__dict__["_decoded_for_admin"]
        return decoded

    # The searchable copy of the subject, under the name the admin always showed it by (``subject``
    # on the models is django-mailer's property, which decodes the row).
    @admin.display(description=_("subject"), ordering="subject_copy")
    def subject(self, instance: Message | MessageLog) -> str:
        return instance.subject_copy or "-"

    @admin.display(description=_("headers"))
    def email_headers(self, instance: Message | MessageLog) -> SafeString | str:
        """The headers not shown as fields of their own: Reply-To and the extra headers."""
        email, problem = self._email(instance)
        if not isinstance(email, EmailMessage):
            return "-"
        rows = [("Reply-To", _text(email.reply_to))] if email.reply_to else []
        rows += [(str(name), _text(value)) for name, value in email.extra_headers.items()]
        return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))

    @admin.display(description=_("plain text body"))
    def plain_text_body(self, instance: Message | MessageLog) -> SafeString | str:
        email, problem = self._email(instance)
        if not isinstance(email, EmailMessage):
            return gettext("Can't decode: %(reason)s") % {"reason": problem} if problem else "-"
        return linebreaksbr(_text(email.body), autoescape=True)

    @admin.display(description=_("alternatives"))
    def alternatives(self, instance: Message | MessageLog) -> SafeString | str:
        """Each alternative's type and source, escaped: HTML is shown as text, never rendered."""
        email, _problem = self._email(instance)
        if not isinstance(email, EmailMultiAlternatives) or not email.alternatives:
            return "-"
        return format_html_join(
            "",
            "<div><strong>{}</strong><br>{}</div>",
            ((mimetype, linebreaksbr(_text(content), autoescape=True)) for content, mimetype in email.alternatives),
        )

    @admin.display(description=_("HTML preview"))
    def html_preview(self, instance: Message | MessageLog) -> SafeString | str:
        """Each HTML part in a frame with every sandbox restriction: no script, no form, no navigation."""
        email, _problem = self._email(instance)
        count = len(_html_parts(email))
        if not count:
            return "-"
        frames = (
            (self._url(instance, "html", index), gettext("HTML part %(number)d") % {"number": index + 1})
            for index in range(count)
        )
        return format_html_join(
            "",
            '<iframe sandbox="" referrerpolicy="no-referrer" src="{}" title="{}" '
            'style="width: 100%; height: 24em; border: 1px solid #ccc; background: #fff"></iframe>',
            frames,
        )

    @admin.display(description=_("attachments"))
    def attachments(self, instance: Message | MessageLog) -> SafeString | str:
        email, _problem = self._email(instance)
        if not isinstance(email, EmailMessage) or not email.attachments:
            return "-"
        links = (
            (self._url(instance, "attachment", index), description)
            for index, description in enumerate(_describe_all(email))
        )
        return format_html("<ul>{}</ul>", format_html_join("", '<li><a href="{}">{}</a></li>', links))

    def _url(self, instance: Message | MessageLog, view: str, index: int) -> str:
        opts = instance._meta
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=[quote(instance.pk), index])

    def get_urls(self) -> list[URLPattern]:
        opts = self.model._meta  # type: ignore[attr-defined]
        wrap = self.admin_site.admin_view  # type: ignore[attr-defined]
        return [
            path(
                "<path:object_id>/html/<int:index>/",
                wrap(self.html_view),
                name=f"{opts.app_label}_{opts.model_name}_html",
            ),
            path(
                "<path:object_id>/attachment/<int:index>/",
                wrap(self.attachment_view),
                name=f"{opts.app_label}_{opts.model_name}_attachment",
            ),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def _viewable_email(self, request: HttpRequest, object_id: str) -> Any:
        if not self.has_view_permission(request):  # type: ignore[attr-defined]
            raise PermissionDenied  # before the lookup, as Django's own views: which rows exist is not told
        instance = self.get_object(request, unquote(object_id))  # type: ignore[attr-defined]
        if instance is None:
            raise Http404
        if not self.has_view_permission(request, instance):  # type: ignore[attr-defined]
            raise PermissionDenied
        return self._email(instance)[0]

    def html_view(self, request: HttpRequest, object_id: str, index: int) -> HttpResponse:
        """The HTML part ``index``, for the preview frame only: the policy lets it run nothing and load nothing."""
        parts = _html_parts(self._viewable_email(request, object_id))
        if index >= len(parts):
            raise Http404
        response = HttpResponse(parts[index], content_type="text/html; charset=utf-8")
        response["Content-Security-Policy"] = PREVIEW_POLICY
        response["X-Frame-Options"] = "SAMEORIGIN"
        response["X-Content-Type-Options"] = "nosniff"
        response["Referrer-Policy"] = "no-referrer"
        return response

    def attachment_view(self, request: HttpRequest, object_id: str, index: int) -> HttpResponse:
        """Attachment ``index`` as a download under a safe name: never shown in the browser, whatever its type."""
        email = self._viewable_email(request, object_id)
        found = list(_attachments(email)) if isinstance(email, EmailMessage) else []
        if index >= len(found):
            raise Http404
        filename, content = found[index]
        response = HttpResponse(content, content_type="application/octet-stream")
        response["Content-Disposition"] = content_disposition_header(True, _safe_filename(filename, index))
        response["X-Content-Type-Options"] = "nosniff"
        return response

    @admin.display(description=_("sender"), ordering="from_email")
    def sender(self, instance: Message | MessageLog) -> str:
        return instance.from_email or "-"

    @admin.display(description=_("last error"))
    def last_error(self, instance: Any) -> str:
        """The server's reply at the latest failure of the message (annotated on the queryset), shortened."""
        error = getattr(instance, "latest_error", None)
        return Truncator(error).chars(120) if error else "-"


def _text(value: Any) -> str:
    """Return ``value`` as plain text: lists joined, bytes decoded; a str subclass (SafeString) made a plain str."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)[:]  # slicing gives a plain str: a SafeString is escaped like any text


def _html_parts(email: Any) -> list[str]:
    if not isinstance(email, EmailMultiAlternatives):
        return []
    return [_text(content) for content, mimetype in email.alternatives if mimetype == "text/html"]


def _attachments(email: EmailMessage) -> Iterator[tuple[str, bytes]]:
    """Each attachment's file name (as the message gives it) and content, in bytes."""
    for attachment in email.attachments:
        if isinstance(attachment, MIMEMessage):  # a MIMEBase, or Django 6.1's MIMEPart
            payload = attachment.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else attachment.as_bytes()
            yield attachment.get_filename() or "", content
        else:
            filename, content, _mimetype = attachment
            yield filename or "", _bytes_of(content)


def _bytes_of(content: Any) -> bytes:
    """The content of a (filename, content, mimetype) attachment as the file it is: text, bytes, a message."""
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, EmailMessage):  # a message/rfc822 attachment given as an email
        return bytes(content.message().as_bytes())
    if isinstance(content, MIMEMessage):
        return content.as_bytes()
    return bytes(content or b"")


def _safe_filename(name: str, index: int) -> str:
    """A file name to save under: no directory, no control character, no leading dot; a plain one if none is left."""
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(character for character in name if character.isprintable()).strip(" .")
    return name[:150] or f"attachment-{index + 1}"


def _describe_all(email: EmailMessage) -> list[str]:
    described = []
    for attachment in email.attachments:
        if isinstance(attachment, tuple):
            filename, content, mimetype = attachment
            size = len(content) if isinstance(content, (str, bytes)) else 0
            described.append(
                f"{filename or gettext('(no name)')} ({mimetype or 'application/octet-stream'}, {size} bytes)"
            )
        else:
            filename = attachment.get_filename() or gettext("(no name)")
            described.append(f"{filename} ({attachment.get_content_type()})")
    return described


# The pages are read-only: with nothing to edit, no save can write an old copy of a row back. The
# priority too: moving a deferred message back would bypass MAILER_EMAIL_MAX_RETRIES (the defer and
# retry actions change it).
MESSAGE_FIELDS = (
    *("priority", "state", "failed_permanently", "retry_after", "when_added", "retry_count", "last_error"),
    *("subject", "from_email", "recipients", "message_id"),
    *("email_headers", "plain_text_body", "alternatives", "html_preview", "attachments", "log_rows"),
)
LOG_FIELDS = (
    *("result", "when_attempted", "when_added", "priority", "log_message", "queued_message"),
    *("subject", "from_email", "recipients", "message_id"),
    *("email_headers", "plain_text_body", "alternatives", "html_preview", "attachments"),
)


class MessageState(admin.SimpleListFilter):
    """Where a message stands: waiting in the queue, deferred, refused for good, or held by a sending pass."""

    title = _("state")
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("queued", _("queued")),
            ("deferred", _("deferred")),
            ("failed", _("permanently failed")),
            ("sending", _("being sent")),
        ]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        now = timezone.now()
        if self.value() == "queued":
            return queryset.non_deferred().claimable(now)
        if self.value() == "deferred":
            return queryset.deferred().filter(failed_permanently=False)
        if self.value() == "failed":
            return queryset.filter(failed_permanently=True)
        if self.value() == "sending":
            return queryset.filter(claimed_until__gt=now)
        return queryset


def _latest_failure(message_id: Any) -> Subquery:
    """The server's reply at the latest failure logged for the Message-ID ``message_id`` (a column reference)."""
    failures = MessageLog.objects.filter(message_id=message_id, result=RESULT_FAILURE)
    return Subquery(failures.order_by("-when_attempted", "-pk").values("log_message")[:1])


@admin.register(Message)
class MessageAdmin(StoredEmailDisplay, admin.ModelAdmin):
    list_display = ["id", "recipients", "sender", "subject", "priority", "state", "age", "retry_count"]
    list_display += ["last_error", "message_id"]
    search_fields = ["subject_copy", "from_email", "recipients", "message_id"]
    list_filter = ["priority", MessageState, "when_added"]
    fields = MESSAGE_FIELDS
    readonly_fields = MESSAGE_FIELDS
    date_hierarchy = "when_added"
    actions = ["send_messages", "defer_messages", "retry_messages", "requeue_failed_messages", "add_to_dont_send"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        annotated: QuerySet[Message] = (
            super().get_queryset(request).annotate(latest_error=_latest_failure(OuterRef("message_id")))
        )
        return annotated

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # mail is queued by code, never typed in as data

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        """The actions need the permission; a message's own page is read-only all the same.

        Saving it would write back the row as read at the start of the
        request: over a claim a sender made meanwhile, or, once the message
        was sent and taken off the queue, as a new row, queued again.
        """
        return obj is None and super().has_change_permission(request)

    def has_dont_send_permission(self, request: HttpRequest) -> bool:
        opts = DontSendEntry._meta
        return request.user.has_perm(f"{opts.app_label}.add_{opts.model_name}")

    @admin.display(description=_("state"))
    def state(self, message: Message) -> str:
        if message.failed_permanently:
            return gettext("permanently failed")
        if message.priority == PRIORITY_DEFERRED:
            return gettext("deferred")
        if message.claimed_until and message.claimed_until > timezone.now():
            return gettext("being sent")
        return gettext("queued")

    @admin.display(description=_("age"), ordering="when_added")
    def age(self, message: Message) -> str:
        return timesince(message.when_added)

    @admin.display(description=_("log"))
    def log_rows(self, message: Message) -> SafeString | str:
        """Links to the log rows of this message (by its Message-ID), the latest first."""
        if not message.message_id:
            return "-"
        rows = MessageLog.objects.filter(message_id=message.message_id).order_by("-when_attempted", "-pk")
        links = [
            (
                reverse("admin:mailer_messagelog_change", args=[quote(row.pk)]),
                f"{row.when_attempted:%Y-%m-%d %H:%M:%S}",
                row.get_result_display(),
                Truncator(row.log_message).chars(120),
            )
            for row in rows.defer("message_data")[:50]
        ]
        if not links:
            return "-"
        return format_html("<ul>{}</ul>", format_html_join("", '<li><a href="{}">{} {}</a> {}</li>', links))

    @admin.action(description=_("Send selected messages now"), permissions=["change"])
    def send_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        """Make a pass over the selected messages that are not deferred, as ``send_mail`` would.

        The pass honours ``MAILER_PAUSE_SEND`` and the lock; deferred
        messages stay deferred (``retry`` puts them back, within
        ``MAILER_EMAIL_MAX_RETRIES``). The counts are the pass's own: what
        it sent, deferred and logged, not what was selected.
        """
        ready = queryset.non_deferred()
        deferred_before = queryset.count() - ready.count()
        try:
            counts = engine.send_all(ready)
        except Exception as exc:  # the pass has set the message aside and logged why: say so, not a 500
            self.message_user(
                request, gettext("The pass stopped: %(error)s") % {"error": type(exc).__name__}, messages.ERROR
            )
            return
        if counts is None:
            self.message_user(
                request, _("Nothing was sent: sending is paused, or another process is sending."), messages.WARNING
            )
            return
        text = _(
            "Message(s) sent: %(sent)d sent, %(deferred)d deferred, %(failed)d failed permanently, "
            "%(dont_send)d not sent (don't send list)."
        ) % {
            "sent": counts["sent"],
            "deferred": counts["deferred"],
            "failed": counts["failed"],
            "dont_send": counts["dont_send"],
        }
        if deferred_before:
            left = ngettext(
                "%d deferred message was left as it was.",
                "%d deferred messages were left as they were.",
                deferred_before,
            )
            text += " " + left % deferred_before
        self.message_user(request, text, messages.INFO)

    @admin.action(description=_("Defer selected messages"), permissions=["change"])
    def defer_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        count = 0
        for message in queryset.non_deferred().defer("message_data"):
            message.defer()
            count += 1
        self.message_user(request, ngettext("%d message deferred.", "%d messages deferred.", count) % count)

    @admin.action(description=_("Retry selected deferred messages"), permissions=["change"])
    def retry_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        """Put the selected deferred messages back in the queue, within ``MAILER_EMAIL_MAX_RETRIES``."""
        count = queryset.retry_deferred()
        self.message_user(request, ngettext("%d message queued again.", "%d messages queued again.", count) % count)

    @admin.action(description=_("Requeue selected permanent failures"), permissions=["change"])
    def requeue_failed_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        """Put messages the mail server refused for good back in the queue: a human has decided to try again."""
        count = queryset.requeue_failed()
        self.message_user(request, ngettext("%d message queued again.", "%d messages queued again.", count) % count)

    @admin.action(
        description=_("Add the recipients of the selected messages to the don't send list"), permissions=["dont_send"]
    )
    def add_to_dont_send(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        """List every recipient (To, Cc and Bcc) of the selected messages; the next pass logs them as "don't send"."""
        recipients: list[str] = []
        for message in queryset.only("pk", "message_data"):
            email, _problem = self._email(message)
            if isinstance(email, EmailMessage):
                recipients.extend(str(address) for address in email.recipients())
        added = DontSendEntry.objects.add_addresses(recipients)
        self.message_user(
            request,
            ngettext(
                "%d address added to the don't send list.", "%d addresses added to the don't send list.", len(added)
            )
            % len(added),
        )


@admin.register(DontSendEntry)
class DontSendEntryAdmin(admin.ModelAdmin):
    list_display = ["to_address", "when_added"]
    search_fields = ["to_address"]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"when_added": timezone.now(), **super().get_changeform_initial_data(request)}


@admin.register(MessageLog)
class MessageLogAdmin(StoredEmailDisplay, admin.ModelAdmin):
    list_display = ["id", "recipients", "sender", "subject", "priority", "when_attempted", "result"]
    list_display += ["server_reply", "message_id", "queued_message"]
    list_filter = ["result", "when_attempted"]
    date_hierarchy = "when_attempted"
    fields = LOG_FIELDS
    readonly_fields = LOG_FIELDS
    search_fields = ["message_id", "subject_copy", "from_email", "recipients"]
    actions = ["requeue_copies"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[MessageLog]:
        queued = Message.objects.filter(message_id=OuterRef("message_id")).order_by("pk").values("pk")[:1]
        annotated: QuerySet[MessageLog] = super().get_queryset(request).annotate(queued_pk=Subquery(queued))
        return annotated

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the log is what happened: written by the engine only

    def has_change_permission(self, request: HttpRequest, obj: MessageLog | None = None) -> bool:
        return False

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        """Queueing a copy changes the queue: it needs the change permission on messages."""
        opts = Message._meta
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.display(description=_("server's reply"), ordering="log_message")
    def server_reply(self, row: MessageLog) -> str:
        return Truncator(row.log_message).chars(120) if row.log_message else "-"

    @admin.display(description=_("still queued"))
    def queued_message(self, row: MessageLog) -> SafeString | str:
        """A link to the message while it is still in the queue (deferred, or waiting for a retry)."""
        pk = getattr(row, "queued_pk", None)
        if pk is None:
            return "-"
        return format_html('<a href="{}">{}</a>', reverse("admin:mailer_message_change", args=[quote(pk)]), f"#{pk}")

    @admin.action(description=_("Queue the selected failed messages again"), permissions=["requeue"])
    def requeue_copies(self, request: HttpRequest, queryset: QuerySet[MessageLog]) -> None:
        """Queue a copy of each selected failure whose row kept the message and which is no longer queued.

        A message still in the queue (deferred, or waiting for a retry) is
        not copied: it would be sent twice. Several rows of one message
        queue one copy. The copy keeps the Message-ID, so its log rows join
        the earlier ones; it goes through the queueing checks again (the
        don't-send list, the addresses).
        """
        queued = 0
        copied: set[str] = set()
        # Not a failure that a later attempt got through (or the don't-send list stopped): that would send twice.
        settled = MessageLog.objects.filter(
            message_id=OuterRef("message_id"), result__in=[RESULT_SUCCESS, RESULT_DONT_SEND]
        )
        failures = queryset.filter(result=RESULT_FAILURE, queued_pk__isnull=True).exclude(  # type: ignore[misc]
            Exists(settled)
        )
        for row in failures.order_by("-when_attempted"):
            if row.message_id in copied:
                continue
            email, _problem = self._email(row)
            if not isinstance(email, EmailMessage):
                continue  # the row keeps no content (MAILER_EMAIL_LOG_MESSAGE_DATA off), or cannot be read
            priority = row.priority if row.priority in (PRIORITY_HIGH, PRIORITY_MEDIUM, PRIORITY_LOW) else None
            try:
                message = Message.for_email(email, priority=priority)
            except Exception as exc:  # an address that no longer passes the checks: not queued, not counted
                logger.warning("log row %s not queued again: %s", row.pk, exc)
                continue
            message.save()
            copied.add(row.message_id or f"row {row.pk}")
            queued += 1
        self.message_user(request, ngettext("%d message queued again.", "%d messages queued again.", queued) % queued)
