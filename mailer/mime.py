"""MIME objects that mailer reads back from storage."""

import email.message
import email.policy
from email.mime.base import MIMEBase
from typing import Any


class StoredMIMEBase(MIMEBase):
    """A legacy ``email.mime`` attachment read back from storage.

    Django treats ``MIMEBase`` instances as ready-made parts; the parser
    needs a class it can create without arguments, which ``MIMEBase`` is not.
    """

    def __init__(self, policy: Any = email.policy.compat32) -> None:
        email.message.Message.__init__(self, policy=policy)
