"""The admin: the queue, the log and the don't-send list.

A stored message is shown decoded and escaped, never as its raw data, and
can't be edited: rows are data from outside (an old pickle, a forged row),
and the search columns must always describe what is stored. Every action
needs the model's change permission.
"""

from typing import Any

from django.contrib import admin, messages
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.http import HttpRequest
from django.template.defaultfilters import linebreaksbr
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from mailer import engine
from mailer.codec import decode
from mailer.exceptions import UndecodableData
from mailer.models import DontSendEntry, Message, MessageLog, MessageQuerySet


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

    @admin.display(description=_("attachments"))
    def attachments(self, instance: Message | MessageLog) -> SafeString | str:
        email, _problem = self._email(instance)
        if not isinstance(email, EmailMessage) or not email.attachments:
            return "-"
        return format_html("<ul>{}</ul>", format_html_join("", "<li>{}</li>", ((a,) for a in _describe_all(email))))


def _text(value: Any) -> str:
    """Return ``value`` as plain text: lists joined, bytes decoded; a str subclass (SafeString) made a plain str."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)[:]  # slicing gives a plain str: a SafeString is escaped like any text


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


@admin.register(Message)
class MessageAdmin(StoredEmailDisplay, admin.ModelAdmin):
    list_display = ["id", "recipients", "subject", "when_added", "priority", "failed_permanently", "retry_count"]
    search_fields = ["subject", "from_email", "recipients", "message_id"]
    list_filter = ["priority", "failed_permanently"]
    fields = ["priority", "failed_permanently", "retry_after", "when_added", "retry_count"]
    fields += ["subject", "from_email", "recipients", "message_id"]
    fields += ["email_headers", "plain_text_body", "alternatives", "attachments"]
    # The priority too: moving a deferred message back would bypass MAILER_EMAIL_MAX_RETRIES; the
    # actions (defer, retry) change it. With nothing to edit, no save can write an old copy back.
    readonly_fields = ["priority", "failed_permanently", "retry_after", "when_added", "retry_count"]
    readonly_fields += ["subject", "from_email", "recipients", "message_id"]
    readonly_fields += ["email_headers", "plain_text_body", "alternatives", "attachments"]
    date_hierarchy = "when_added"
    actions = ["send_messages", "defer_messages", "retry_messages", "requeue_failed_messages"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # mail is queued by code, never typed in as data

    @admin.action(description=_("Send selected messages now"), permissions=["change"])
    def send_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        """Make a pass over the selected messages that are not deferred, as ``send_mail`` would.

        The pass honours ``MAILER_PAUSE_SEND`` and the lock; deferred
        messages stay deferred (``retry`` puts them back, within
        ``MAILER_EMAIL_MAX_RETRIES``).
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


@admin.register(DontSendEntry)
class DontSendEntryAdmin(admin.ModelAdmin):
    list_display = ["to_address", "when_added"]
    search_fields = ["to_address"]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"when_added": timezone.now(), **super().get_changeform_initial_data(request)}


@admin.register(MessageLog)
class MessageLogAdmin(StoredEmailDisplay, admin.ModelAdmin):
    list_display = ["id", "recipients", "subject", "message_id", "when_attempted", "result"]
    list_filter = ["result"]
    date_hierarchy = "when_attempted"
    fields = ["result", "when_attempted", "when_added", "priority", "log_message", "subject", "from_email"]
    fields += ["recipients", "message_id", "email_headers", "plain_text_body", "alternatives", "attachments"]
    readonly_fields = ["result", "when_attempted", "when_added", "priority", "log_message", "subject", "from_email"]
    readonly_fields += ["recipients", "message_id", "email_headers", "plain_text_body", "alternatives", "attachments"]
    search_fields = ["message_id", "subject", "from_email", "recipients"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the log is what happened: written by the engine only

    def has_change_permission(self, request: HttpRequest, obj: MessageLog | None = None) -> bool:
        return False
