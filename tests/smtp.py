"""A real SMTP server on loopback that records what it receives.

It can also be told to answer with a chosen reply code, so the tests see the
same ``smtplib`` exceptions a real mail server would cause.
"""

import email
import email.policy
import socket
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass
class Recorder:
    """The aiosmtpd handler: keeps each accepted message, answers as told."""

    received: list[Received] = field(default_factory=list)
    connections: int = 0
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages_per_session: int | None = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        session.messages = getattr(session, "messages", 0) + 1
        if self.messages_per_session is not None and session.messages > self.messages_per_session:
            return "421 4.7.0 Too many messages in this session"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 Message accepted for delivery"


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1 and a free port, for one test."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.controller = Controller(self.recorder, hostname=self.host, port=self.port)
        self.running = False

    def start(self) -> "SMTPServer":
        self.controller.start()
        self.running = True
        return self

    def stop(self) -> None:
        """Stop listening; safe to call twice, so a test may stop the server early."""
        if self.running:
            self.controller.stop()
            self.running = False

    @property
    def received(self) -> list[Received]:
        return self.recorder.received

    @property
    def connections(self) -> int:
        return self.recorder.connections

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 No such user") -> None:
        self.recorder.rcpt_replies[address] = reply

    def reply_to_data(self, reply: str | None) -> None:
        self.recorder.data_reply = reply

    def limit_messages_per_session(self, limit: int | None) -> None:
        """Answer 421 to any further MAIL FROM in a session once ``limit`` messages have come through it."""
        self.recorder.messages_per_session = limit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
