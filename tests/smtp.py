"""A real SMTP server on loopback that records what it receives.

It can also be told to answer with a chosen reply code, or to end sessions
the way real mail servers do, so the tests see the same ``smtplib``
exceptions a real mail server would cause.
"""

import asyncio
import email
import email.policy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    # Which connection brought it: 1 for the first the server accepted, and so on.
    session: int = 0
    # time.monotonic() when the server accepted the message: the tests run
    # in the server's process, so it compares with their own clock.
    received_at: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass
class Recorder:
    """The aiosmtpd handler: keeps each accepted message, answers as told."""

    received: list[Received] = field(default_factory=list)
    connections: int = 0
    quits: int = 0
    hang_ups: int = 0
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages_per_session: int | None = None
    hang_up_after: int | None = None
    # Take the message to this recipient, then hang up without answering its DATA (once).
    hang_up_taking: str | None = None
    # Hang up at the DATA command of the message to this recipient, before any of its text (once).
    hang_up_at_data: str | None = None
    on_message: Callable[[Received], None] | None = None
    delay: float = 0.0
    # How many messages the server has begun to take (their DATA), accepted or not yet.
    messages_begun: int = 0
    # At most this many sessions at once; more are refused at the greeting (421), and counted.
    session_limit: int | None = None
    open_sessions: int = 0
    sessions_refused: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.number = self.connections
        session.host_name = hostname
        return responses

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        return "221 Bye"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        session.messages = getattr(session, "messages", 0) + 1
        if self.messages_per_session is not None and session.messages > self.messages_per_session:
            self._hang_up(server)
            return "421 4.7.0 Too many messages in this session, closing connection"
        reply = self.mail_replies.get(address)
        if reply:
            return reply
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
        self.messages_begun += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # other sessions go on meanwhile
        if self.data_reply:
            return self.data_reply
        received = Received(
            envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, getattr(session, "number", 0)
        )
        if self.on_message is not None:
            self.on_message(received)
        self.received.append(received)
        if self.hang_up_taking in envelope.rcpt_tos:
            self.hang_up_taking = None
            self.hang_ups += 1
            server.transport.abort()  # at once: the reply is never written
            return "250 never written"
        if self.hang_up_after is not None and session.messages >= self.hang_up_after:
            self._hang_up(server)
        return "250 Message accepted for delivery"

    def _hang_up(self, server) -> None:
        """Close the connection once the reply being returned has been written, as a server ending a session does.

        The hook returns before aiosmtpd writes its reply, and the loop runs
        the callback only after that write.
        """
        self.hang_ups += 1
        server.loop.call_soon(server.transport.close)


class SessionLimitingSMTP(SMTP):
    """aiosmtpd's SMTP session, refused at the greeting while the server has ``session_limit`` open, as
    Postfix (``smtpd_client_connection_count_limit``), Exchange and hosted services refuse a client.
    """

    async def _handle_client(self) -> None:
        recorder = cast(Recorder, self.event_handler)
        if recorder.session_limit is not None and recorder.open_sessions >= recorder.session_limit:
            recorder.sessions_refused += 1
            await self.push("421 4.7.0 Too many concurrent SMTP connections from this IP address")
            if self.transport is not None:
                self.transport.close()
            return
        recorder.open_sessions += 1
        try:
            await super()._handle_client()
        finally:
            recorder.open_sessions -= 1

    async def smtp_DATA(self, arg: str) -> None:
        recorder = cast(Recorder, self.event_handler)
        if self.envelope is not None and recorder.hang_up_at_data in self.envelope.rcpt_tos:
            recorder.hang_up_at_data = None
            recorder.hang_ups += 1
            if self.transport is not None:
                cast(asyncio.Transport, self.transport).abort()
            return
        await super().smtp_DATA(arg)


class LoopbackController(Controller):
    """aiosmtpd's Controller, listening on a port the system picks when it binds.

    Asking for a free port first and binding it afterwards races with other
    processes on a busy CI machine; binding port 0 cannot collide.
    """

    def __init__(self, handler, **smtp_options) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, **smtp_options)

    def factory(self):
        return SessionLimitingSMTP(self.handler, **self.SMTP_kwargs)

    async def _create_server(self):
        server = await super()._create_server()
        # start() then connects to self.port to check the server answers.
        self.port = cast(asyncio.Server, server).sockets[0].getsockname()[1]
        return server


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1 and a port of its own, for one test.

    With ``login=(username, password)`` it takes mail only after AUTH with
    them (over plain text: it is loopback): a client that does not log in
    gets 530, one that logs in with anything else 535.
    """

    def __init__(self, login: tuple[str, str] | None = None) -> None:
        self.recorder = Recorder()
        self.host = "127.0.0.1"
        options = {}
        if login is not None:
            options = {
                "auth_required": True,
                "auth_require_tls": False,
                # handled=False: aiosmtpd answers a refusal with 535 itself.
                "authenticator": lambda server, session, envelope, mechanism, auth_data: AuthResult(
                    success=(auth_data.login.decode(), auth_data.password.decode()) == login, handled=False
                ),
            }
        # aiosmtpd warns that AUTH without TLS is unsafe (pyproject.toml lets it pass):
        # on loopback, in a test, it is what is wanted.
        self.controller = LoopbackController(self.recorder, **options)
        self.running = False

    @property
    def port(self) -> int:
        """The port the server listens on; known once it has started."""
        if self.controller.port == 0:
            raise RuntimeError("the server has no port until it is started")
        return self.controller.port

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

    @property
    def quits(self) -> int:
        """How many sessions the client ended properly, with QUIT."""
        return self.recorder.quits

    @property
    def hang_ups(self) -> int:
        """How many sessions the server ended itself."""
        return self.recorder.hang_ups

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 No such user") -> None:
        self.recorder.rcpt_replies[address] = reply

    def reject_sender(self, address: str, reply: str = "550 5.7.1 Sender rejected") -> None:
        """Answer ``MAIL FROM:<address>`` with ``reply``."""
        self.recorder.mail_replies[address] = reply

    def reply_to_data(self, reply: str | None) -> None:
        self.recorder.data_reply = reply

    def limit_messages_per_session(self, limit: int | None) -> None:
        """Once ``limit`` messages have come through a session, answer the next MAIL FROM with 421 and hang up."""
        self.recorder.messages_per_session = limit

    def delay_each_message(self, seconds: float) -> None:
        """Take ``seconds`` to accept each message, as a hosted mail service does; sessions overlap meanwhile."""
        self.recorder.delay = seconds

    def hang_up_after(self, count: int | None) -> None:
        """Close each session, without a word, once it has delivered ``count`` messages (an idle timeout, say)."""
        self.recorder.hang_up_after = count

    def hang_up_taking(self, recipient: str) -> None:
        """Take the next message to ``recipient``, then close the session without answering its DATA."""
        self.recorder.hang_up_taking = recipient

    def hang_up_at_data(self, recipient: str) -> None:
        """Close the session at the DATA command of the next message to ``recipient``, before its text."""
        self.recorder.hang_up_at_data = recipient

    def limit_sessions(self, limit: int | None) -> None:
        """Take at most ``limit`` sessions at once; refuse more with ``421`` at the greeting."""
        self.recorder.session_limit = limit

    @property
    def sessions_refused(self) -> int:
        """How many sessions the server refused at the greeting (``limit_sessions``)."""
        return self.recorder.sessions_refused

    @property
    def messages_begun(self) -> int:
        """How many messages the server has begun to take (DATA), whether or not it has accepted them yet."""
        return self.recorder.messages_begun

    def on_message(self, callback: Callable[[Received], None] | None) -> None:
        """Call ``callback`` in the server's thread with each message, before the server accepts it."""
        self.recorder.on_message = callback
