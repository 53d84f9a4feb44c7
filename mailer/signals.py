"""The signals mailer sends."""

from django.dispatch import Signal

# Sent by every way into the queue (mailer.send_mail and the rest, DbBackend)
# once messages are stored, before the transaction that stored them commits.
# Arguments: ``using``, the alias of the database they are stored in, and
# ``count``, how many. mailer.tasks listens, to have them sent by a Tasks worker.
mail_queued = Signal()
