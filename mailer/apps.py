from django.apps import AppConfig
from django.core import checks
from django.utils.translation import gettext_lazy as _


class MailerConfig(AppConfig):
    name = "mailer"
    verbose_name = _("Mailer")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mailer import signals, tasks
        from mailer.checks import check_mail_delivery

        checks.register(check_mail_delivery)
        checks.register(tasks.check_task_settings)
        # Sites with MAILER_TASK_BACKEND set have queued mail sent by their Tasks worker.
        signals.mail_queued.connect(tasks.on_mail_queued, dispatch_uid="mailer.tasks.on_mail_queued")
