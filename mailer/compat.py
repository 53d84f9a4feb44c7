"""What differs between the supported Django versions, in one place."""

from django.core.mail import EmailMessage


def detach_connection(message: EmailMessage) -> None:
    """Give ``message`` no connection, the way its Django version keeps it.

    Django 6.1 holds it in ``_connection`` behind a deprecated property;
    earlier versions in a plain ``connection`` attribute. Stored and legacy
    messages must not carry one: it would be a live backend from elsewhere.
    """
    message.__dict__.pop("connection", None)
    if isinstance(getattr(type(message), "connection", None), property):
        message.__dict__["_connection"] = None
    else:
        message.connection = None
