"""Mail over SMTP: a real SMTP server (aiosmtpd) on loopback receives what Unhidra sends. Mail
goes out as jobs: a server that says "try later" gets the message once it accepts, a refusal for
good is not retried, and mail waiting for a retry survives a `kill -9` of the server."""

import email
import email.policy
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

import requests
from aiosmtpd.controller import Controller

from conftest import Server

PASSWORD = "maple orbit candle frost 42"


class Inbox:
    """Collects the messages the SMTP server accepts; answers `refusals` (in order) first."""

    def __init__(self, refusals=()):
        self.messages = []
        self.refusals = list(refusals)
        self.refused = 0
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        with self.arrived:
            if self.refusals:
                self.refused += 1
                self.arrived.notify_all()
                return self.refusals.pop(0)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.arrived:
            self.messages.append((envelope.rcpt_tos, message))
            self.arrived.notify_all()
        return "250 OK"

    def wait_refused(self, count, timeout=20):
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.refused >= count, timeout), self.refused

    def wait_for(self, count, timeout=20):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout), self.messages
            return self.messages[count - 1]


def free_port():
    # aiosmtpd checks that it is up by connecting to its port, so it needs a real one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smtp_env(port):
    return {"UNHIDRA_SMTP_URL": f"smtp://127.0.0.1:{port}", "UNHIDRA_MAIL_FROM": "Unhidra <noreply@unhidra.test>"}


def register(base, address):
    response = requests.post(
        f"{base}/api/v1/auth/register", json={"email": address, "password": PASSWORD}, timeout=10
    )
    assert response.status_code == 201, response.text


def verifies(base, message):
    code = re.search(r"Your code: (\S+)", message.get_content()).group(1)
    verified = requests.post(f"{base}/api/v1/auth/verify-email", json={"token": code}, timeout=10)
    return verified.status_code == 204


def token_mail_jobs(server_binary, data_dir):
    """The token-mail jobs, as `unhidra jobs list` prints them (the server may be stopped)."""
    out = subprocess.run(
        [server_binary, "jobs", "list", "--kind", "identity.token_mail", "--data-dir", data_dir],
        env={"PATH": os.environ.get("PATH", ""), "APP_ENV": "test"},
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_a_server_that_says_try_later_gets_the_mail_once_it_accepts(server_binary):
    # A 5xx about the server or the session (554), rather than this message's recipient, is
    # retried too: it says nothing final about the message.
    inbox = Inbox(refusals=["451 4.3.0 Try again later", "554 5.7.1 Service unavailable"])
    port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            srv = Server(server_binary, data_dir, smtp_env(port))
            try:
                register(srv.base_url, "later@example.com")
                recipients, message = inbox.wait_for(1)
                assert recipients == ["later@example.com"]
                assert inbox.refused == 2
                # The token of the attempt that was delivered is the one that works.
                assert verifies(srv.base_url, message)
            finally:
                assert srv.stop() == 0, srv.lines
            assert len(inbox.messages) == 1, "delivered exactly once"
            [job] = token_mail_jobs(server_binary, data_dir)
            assert (job["state"], job["attempt"]) == ("completed", 3), job
    finally:
        smtp.stop()


def test_a_refusal_for_good_is_not_retried(server_binary):
    inbox = Inbox(refusals=["550 5.1.1 No such mailbox"])
    port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            srv = Server(server_binary, data_dir, smtp_env(port))
            try:
                register(srv.base_url, "gone@example.com")
                inbox.wait_refused(1)
            finally:
                assert srv.stop() == 0, srv.lines
            [job] = token_mail_jobs(server_binary, data_dir)
            assert (job["state"], job["attempt"]) == ("discarded", 1), job
            assert "550" in job["last_error"], job
            assert inbox.messages == []
    finally:
        smtp.stop()


def test_mail_waiting_for_its_smtp_server_survives_a_crash(server_binary):
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        # Nothing listens on the port yet: every attempt fails and is retried. A short lease,
        # so that an attempt the kill interrupts is retried soon after the restart.
        env = smtp_env(port) | {"UNHIDRA_JOBS_LEASE": "2s"}
        srv = Server(server_binary, data_dir, env)
        try:
            register(srv.base_url, "crash@example.com")
            wait_until(lambda: any(j["state"] == "retryable" for j in token_mail_jobs(server_binary, data_dir)))
        finally:
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(30)
        inbox = Inbox()
        smtp = Controller(inbox, hostname="127.0.0.1", port=port)
        smtp.start()
        try:
            again = Server(server_binary, data_dir, env)
            try:
                recipients, message = inbox.wait_for(1, timeout=60)
                assert recipients == ["crash@example.com"]
                assert verifies(again.base_url, message)
            finally:
                assert again.stop() == 0, again.lines
            assert len(inbox.messages) == 1
            [job] = token_mail_jobs(server_binary, data_dir)
            assert job["state"] == "completed", job
        finally:
            smtp.stop()


def wait_until(probe, timeout=30):
    """`probe()` once it is truthy, polled every 50 ms for at most `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_verification_mail_is_delivered_over_smtp(server_binary):
    inbox = Inbox()
    port = free_port()
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


def metric(base, name, labels):
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_smtp_server_that_stays_down_opens_the_circuit_and_mail_waits(server_binary):
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = smtp_env(port) | {"UNHIDRA_BREAKER_FAILURES": "2", "UNHIDRA_BREAKER_OPEN_FOR": "3s"}
        srv = Server(server_binary, data_dir, env)
        inbox = Inbox()
        smtp = Controller(inbox, hostname="127.0.0.1", port=port)
        try:
            assert requests.get(f"{srv.base_url}/health/ready", timeout=10).json()["circuits"] == [
                {"dependency": "smtp", "state": "closed"}
            ]
            for n in range(3):
                register(srv.base_url, f"down{n}@example.com")

            def circuit():
                return requests.get(f"{srv.base_url}/health/ready", timeout=10).json()["circuits"][0]["state"]

            wait_until(lambda: circuit() == "open")
            assert metric(srv.base_url, "jobs_breaker_state", 'dependency="smtp"') >= 1
            assert metric(srv.base_url, "jobs_breaker_opened_total", 'dependency="smtp"') >= 1
            # While it is open, mail that comes due waits without using an attempt.
            wait_until(lambda: metric(srv.base_url, "jobs_deferred_total", 'kind="identity.token_mail"') >= 1)
            smtp.start()
            # A probe closes it once its time is up; then every message goes out, once.
            for n in range(3):
                inbox.wait_for(n + 1, timeout=60)
            wait_until(lambda: circuit() == "closed")
        finally:
            assert srv.stop() == 0, srv.lines
            if smtp.loop.is_running():
                smtp.stop()
        assert sorted(r[0] for r, _ in inbox.messages) == [f"down{n}@example.com" for n in range(3)]
        jobs = token_mail_jobs(server_binary, data_dir)
        assert [j["state"] for j in jobs] == ["completed"] * 3, jobs
        assert all(j["attempt"] <= j["max_attempts"] for j in jobs), jobs
