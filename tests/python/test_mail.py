"""Mail over SMTP: a real SMTP server (aiosmtpd) on loopback receives what Unhidra sends."""

import email
import email.policy
import re
import socket
import tempfile
import threading

import requests
from aiosmtpd.controller import Controller

from conftest import Server

PASSWORD = "maple orbit candle frost 42"


class Inbox:
    """Collects the messages the SMTP server accepts."""

    def __init__(self):
        self.messages = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.arrived:
            self.messages.append((envelope.rcpt_tos, message))
            self.arrived.notify_all()
        return "250 OK"

    def wait_for(self, count, timeout=10):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout), self.messages
            return self.messages[count - 1]


def test_verification_mail_is_delivered_over_smtp(server_binary):
    inbox = Inbox()
    # aiosmtpd checks that it is up by connecting to its port, so it needs a real one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            srv = Server(
                server_binary,
                data_dir,
                {
                    "UNHIDRA_SMTP_URL": f"smtp://127.0.0.1:{port}",
                    "UNHIDRA_MAIL_FROM": "Unhidra <noreply@unhidra.test>",
                },
            )
            try:
                response = requests.post(
                    f"{srv.base_url}/api/v1/auth/register",
                    json={"email": "smtp.user@example.com", "password": PASSWORD},
                    timeout=10,
                )
                assert response.status_code == 201, response.text
                recipients, message = inbox.wait_for(1)
                assert recipients == ["smtp.user@example.com"]
                assert message["Subject"] == "Verify your email address"
                assert message["From"] == "Unhidra <noreply@unhidra.test>"
                body = message.get_content()
                code = re.search(r"Your code: (\S+)", body).group(1)
                verified = requests.post(
                    f"{srv.base_url}/api/v1/auth/verify-email", json={"token": code}, timeout=10
                )
                assert verified.status_code == 204, verified.text
            finally:
                assert srv.stop() == 0, srv.lines
    finally:
        smtp.stop()
