"""What a pass could not write to the database, written by the next pass of the same process.

A pass marks a message it sent but could not record (``recording.mark_sent``)
and gives back the claims it did not get to. While the database is down,
neither can be written, and the claims hold until they lapse
(``MAILER_CLAIM_TIMEOUT``): then the sent message would go out again, and
the others wait until then. A process that goes on after such a pass
(``runmailer``, ``runmailer_pg``) knows which messages they are: its next
pass writes them before it claims anything.
"""

import logging
import threading
from collections.abc import Iterable

from mailer.models import Message

logger = logging.getLogger("mailer.engine")

_lock = threading.Lock()
# Message pk: the token of the pass that holds its claim.
_sent_unmarked: dict[int, str] = {}
_claims_kept: dict[int, str] = {}


def sent_unmarked(pk: int, token: str) -> None:
    """Note that the pass ``token`` sent message ``pk`` and could neither record nor mark it."""
    with _lock:
        _sent_unmarked[pk] = token


def claims_kept(pks: Iterable[int], token: str) -> None:
    """Note that the pass ``token`` could not give back its claims of messages ``pks``, which it did not send."""
    with _lock:
        _claims_kept.update(dict.fromkeys(pks, token))


def pending() -> bool:
    """Whether an earlier pass of this process left something for the next one to write."""
    with _lock:
        return bool(_sent_unmarked or _claims_kept)


def finish() -> None:
    """Mark as sent, and give back, what earlier passes of this process could not.

    A database error is raised, and the pass that called this sends
    nothing: the database that could not take these writes is still down.
    A claim that has lapsed meanwhile is no longer the pass's to mark or
    give back, and is left as it is.
    """
    with _lock:
        sent, kept = dict(_sent_unmarked), dict(_claims_kept)
    for pk, token in sent.items():
        if Message.objects.mark_sent(pk, token):
            logger.warning("message %s, sent by an earlier pass that could not record it, is marked as sent", pk)
        with _lock:
            _sent_unmarked.pop(pk, None)
    for token in set(kept.values()):
        pks = [pk for pk, holder in kept.items() if holder == token]
        Message.objects.filter(pk__in=pks, claimed_by=token).update(claimed_until=None)
        with _lock:
            for pk in pks:
                _claims_kept.pop(pk, None)
