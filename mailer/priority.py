"""Priorities of queued messages.

This module imports no models, so settings modules and ``OPTIONS`` can use
the constants; ``mailer.models`` exports them too, as django-mailer 2.x did.
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
