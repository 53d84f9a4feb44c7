"""Priorities of queued messages.

This module imports no models and reads no settings, so a settings module
can use the constants (``from mailer.priority import PRIORITY_HIGH``) in a
``DbBackend`` mailer's ``OPTIONS``; ``mailer.models`` exports them too, as
django-mailer 2.x did.
"""

import warnings

PRIORITY_HIGH = 1
PRIORITY_MEDIUM = 2
PRIORITY_LOW = 3
PRIORITY_DEFERRED = 4

PRIORITIES = [
    (PRIORITY_HIGH, "high"),
    (PRIORITY_MEDIUM, "medium"),
    (PRIORITY_LOW, "low"),
    (PRIORITY_DEFERRED, "deferred"),
]

PRIORITY_MAPPING = {label: value for value, label in PRIORITIES}


def get_priority(priority: int | str | None) -> int:
    """Return the ``PRIORITY_*`` value for ``priority``; None means medium.

    The labels "high", "medium", "low" and "deferred" are still accepted, with
    a DeprecationWarning; anything else is a ValueError.
    """
    if priority is None:
        return PRIORITY_MEDIUM
    if isinstance(priority, str):
        if priority not in PRIORITY_MAPPING:
            raise ValueError(f"Invalid priority {priority!r}")
        warnings.warn(
            f"Please pass one of the PRIORITY_* constants to 'send_mail' and 'send_html_mail', not '{priority}'.",
            DeprecationWarning,
            stacklevel=2,
        )
        return PRIORITY_MAPPING[priority]
    if isinstance(priority, bool) or priority not in PRIORITY_MAPPING.values():
        raise ValueError(f"Invalid priority {priority!r}")
    return priority


# What a DbBackend mailer's "priority" option may name: the priorities mail
# is queued at. "deferred" is where failed mail waits for retry_deferred.
QUEUEING_PRIORITIES = {"high": PRIORITY_HIGH, "medium": PRIORITY_MEDIUM, "low": PRIORITY_LOW}


def priority_option(value: int | str | None) -> int:
    """Return the priority a ``DbBackend`` mailer's ``priority`` option names; None means medium.

    A settings file may give a label ("high", "medium", "low") or a
    constant; no warning, unlike ``get_priority``, whose labels are
    deprecated arguments of ``send_mail``. Anything else is a ValueError.
    """
    if value is None:
        return PRIORITY_MEDIUM
    if isinstance(value, str) and value in QUEUEING_PRIORITIES:
        return QUEUEING_PRIORITIES[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in QUEUEING_PRIORITIES.values():
        return value
    raise ValueError(
        f"the priority option must be 'high', 'medium', 'low' or one of PRIORITY_HIGH, PRIORITY_MEDIUM, "
        f"PRIORITY_LOW (from mailer.priority), not {value!r}."
    )
