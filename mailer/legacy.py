"""Read the pickles that django-mailer stored, without running code from them.

django-mailer 2.x stored ``base64(pickle(EmailMessage))``; releases before
2.0 stored the raw pickle. A pickle can name any function to call, so anyone
able to write one row could run code in the sending worker. This unpickler
admits only what an email is made of: Django's and the standard library's
email classes, plain containers and scalars, and dates. Anything else is
refused, naming what was asked for.

``MAILER_LEGACY_PICKLE_CLASSES`` admits more classes by dotted path, for
sites whose old rows hold their own ``EmailMessage`` subclass.
"""

import _compat_pickle
import base64
import binascii
import io
import pickle
from typing import Any

from django.core.mail import EmailAlternative, EmailAttachment, EmailMessage, EmailMultiAlternatives

from mailer import conf
from mailer.compat import detach_connection
from mailer.exceptions import RefusedPickle, UndecodableData

# Modules whose classes (never their functions) an email may be made of.
CLASS_MODULES = {
    "django.core.mail",
    "django.core.mail.message",
    "django.utils.safestring",
}

BACKEND_MODULES = {"mailer.backend"}

ALLOWED_GLOBALS = {
    ("builtins", "object"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("builtins", "complex"),
    # How protocols 0 and 1 rebuild objects, and protocol 2 stores bytes.
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
    ("collections", "OrderedDict"),
    ("datetime", "date"),
    ("datetime", "datetime"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("decimal", "Decimal"),
    # Header objects of email.policy.default pickle through this function.
    ("email.headerregistry", "_reconstruct_header"),
}


class DiscardedConnection:
    """Stands in for a pickled email backend: takes any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals an email is made of."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (pickles from before django-mailer 2.0), as pickle maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if "." in name or name.startswith("__"):
            raise RefusedPickle(f"legacy pickle refused: it asks for {module}.{name}")
        if (module, name) in ALLOWED_GLOBALS or f"{module}.{name}" in _extra_classes():
            return super().find_class(module, name)
        if module in CLASS_MODULES or module == "email" or module.startswith("email."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if module in BACKEND_MODULES or module.startswith("django.core.mail.backends."):
            # Mail queued through DbBackend pickled the backend along, as the
            # message's connection. It is dropped once read, so nothing of the
            # real class is needed: not even its constructor may run.
            return DiscardedConnection
        raise RefusedPickle(f"legacy pickle refused: it asks for {module}.{name}")


def _extra_classes() -> set[str]:
    return set(conf.get_setting("MAILER_LEGACY_PICKLE_CLASSES"))


def loads(data: str) -> Any:
    """Decode a django-mailer row: base64 of a pickle, or (before 2.0) the pickle itself.

    Raise UndecodableData, saying why, when it is neither or when it asks
    for something that is not admitted.
    """
    try:
        value = _unpickle(base64.b64decode(data.encode("ascii")))
    except RefusedPickle:
        raise
    except (UnicodeEncodeError, binascii.Error, UndecodableData):
        try:
            value = _unpickle(data.encode("latin-1"))
        except RefusedPickle:
            raise
        except (UnicodeEncodeError, UndecodableData) as exc:
            raise UndecodableData("message data is neither JSON nor a django-mailer pickle") from exc
    if isinstance(value, EmailMessage):
        _upgrade_parts(value)
        detach_connection(value)
    return value


def _unpickle(raw: bytes) -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(raw)).load()
    except UndecodableData:
        raise
    except Exception as exc:
        raise UndecodableData(f"message data is not a readable pickle: {type(exc).__name__}: {exc}") from exc


def _upgrade_parts(email: EmailMessage) -> None:
    """Turn the plain tuples of messages pickled before Django 5.2 into the named tuples Django now expects."""
    if isinstance(email, EmailMultiAlternatives) and email.alternatives:
        email.alternatives = [EmailAlternative(*item) if type(item) is tuple else item for item in email.alternatives]
    if email.attachments:
        email.attachments = [EmailAttachment(*item) if type(item) is tuple else item for item in email.attachments]
