from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from mailer import engine
from mailer.models import DontSendEntry, Message, MessageLog, MessageQuerySet


class MessageAdminMixin:
    @admin.display(description=_("plain text body"))
    def plain_text_body(self, instance: Message | MessageLog) -> str:
        email = instance.email
        return email.body if hasattr(email, "body") else "<Can't decode>"


@admin.register(Message)
class MessageAdmin(MessageAdminMixin, admin.ModelAdmin):
    list_display = ["id", "recipients", "subject", "when_added", "priority", "retry_count"]
    search_fields = ["subject", "from_email", "recipients"]
    list_filter = ["priority"]
    readonly_fields = ["subject", "from_email", "recipients", "plain_text_body"]
    date_hierarchy = "when_added"
    actions = ["send_messages"]

    @admin.action(description=_("Send selected messages"))
    def send_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        counts = engine.send_all(queryset)
        if counts is None:
            self.message_user(
                request, _("Nothing was sent: sending is paused, or another process is sending."), messages.WARNING
            )
            return
        self.message_user(
            request,
            _("Message(s) sent: %(sent)d sent, %(deferred)d deferred.")
            % {"sent": counts["sent"], "deferred": counts["deferred"]},
            messages.INFO,
        )


@admin.register(DontSendEntry)
class DontSendEntryAdmin(admin.ModelAdmin):
    list_display = ["to_address", "when_added"]
    search_fields = ["to_address"]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"when_added": timezone.now(), **super().get_changeform_initial_data(request)}


@admin.register(MessageLog)
class MessageLogAdmin(MessageAdminMixin, admin.ModelAdmin):
    list_display = ["id", "recipients", "subject", "message_id", "when_attempted", "result"]
    list_filter = ["result"]
    date_hierarchy = "when_attempted"
    readonly_fields = ["subject", "from_email", "recipients", "plain_text_body", "message_id"]
    search_fields = ["message_id", "subject", "from_email", "recipients"]
