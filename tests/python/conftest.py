"""Starts the real `unhidra` binary for the Python clients, on a port the OS picks."""

import json
import os
import subprocess
import tempfile
import threading

import pytest

# Bounds every wait on the server, so a broken build fails instead of hanging.
WAIT_SECONDS = 30


class Server:
    """A running `unhidra serve` and its JSON log lines."""

    def __init__(self, binary, data_dir, extra_env=None):
        env = {"PATH": os.environ.get("PATH", ""), "APP_ENV": "test", "UNHIDRA_LOG": "info"}
        env.update(extra_env or {})
        self.lines = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            [binary, "serve", "--bind", "127.0.0.1:0", "--data-dir", data_dir],
            env=env,
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.address = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(WAIT_SECONDS):
            self.stop()
            raise RuntimeError(f"server did not start: {self.lines}")
        self.base_url = f"http://{self.address}"

    def _read(self):
        for line in self.proc.stderr:
            record = json.loads(line)
            self.lines.append(record)
            if record.get("message") == "unhidra listening":
                self.address = record["address"]
                self._listening.set()

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="session")
def server_binary():
    binary = os.environ.get("SERVER_BIN")
    if not binary or not os.path.exists(binary):
        pytest.fail("SERVER_BIN must name a built `unhidra` binary (scripts/test sets it)")
    return binary


# The admin that the session's server creates at start.
ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "velvet thunder quietly seven lamps"


@pytest.fixture(scope="session")
def server(server_binary):
    env = {
        "UNHIDRA_ADMIN_EMAIL": ADMIN_EMAIL,
        "UNHIDRA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        # The fuzzer sends wrong passwords for every email it sees; the lockout itself is
        # tested in the Rust suite.
        "UNHIDRA_LOCKOUT_THRESHOLD": "0",
        # The fuzzer sends thousands of requests from one address; limits are tested in Rust.
        "UNHIDRA_RATE_LIMIT_LOGIN_PER_MINUTE": "0",
        "UNHIDRA_RATE_LIMIT_LOGIN_IP_PER_MINUTE": "0",
        "UNHIDRA_RATE_LIMIT_REGISTER_PER_HOUR": "0",
        "UNHIDRA_RATE_LIMIT_REFRESH_PER_MINUTE": "0",
        "UNHIDRA_DEVICE_REGISTRATIONS_PER_HOUR": "0",
        "UNHIDRA_DEVICE_CLAIMS_PER_HOUR": "0",
        "UNHIDRA_DEVICE_AUTH_FAILURES_PER_MINUTE": "0",
        "UNHIDRA_TELEMETRY_BATCHES_PER_MINUTE": "0",
        # The next retention job waits an hour: test_openapi.py hands it to the job routes, and
        # it must not run (and complete) while they are fuzzed.
        "UNHIDRA_RETENTION_INTERVAL": "1h",
    }
    with tempfile.TemporaryDirectory() as data_dir:
        # A firmware signing key made with the CLI, as on a build machine; the server trusts
        # its public half, and the tests sign images with it (`srv.firmware_key`).
        key = os.path.join(data_dir, "release")
        subprocess.run([server_binary, "firmware", "keygen", "--out", key], check=True, capture_output=True)
        env["UNHIDRA_OTA_TRUSTED_KEYS"] = key + ".pub.pem"
        srv = Server(server_binary, data_dir, env)
        srv.firmware_key = key + ".pem"
        yield srv
        assert srv.stop() == 0, srv.lines
