"""Schemathesis, an independent client, checks every operation against the OpenAPI document."""

import base64
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD

HERE = Path(__file__).parent


# Operations that revoke or demote the session the run is logged in with: fuzzed in a second
# run of their own, after every other operation, so that they cannot turn the rest into 401s.
SELF_HARMING = [
    "/api/v1/auth/logout",
    "/api/v1/auth/sessions/{id}",
    "/api/v1/admin/users/{id}",
    "/api/v1/admin/users/bulk",
    "/api/v1/admin/keys/rotate",
    "/api/v1/admin/keys/{kid}/retire",
]

# Authenticated operations that generated data cannot make succeed, each with why; every other
# authenticated operation must have answered 2xx at least once, or the run was hollow.
NO_SUCCESS_EXPECTED = {
    ("POST", "/api/v1/auth/login/mfa"): "needs a live MFA challenge and a TOTP code",
    ("POST", "/api/v1/auth/totp/enable"): "needs a code from the enrolled secret",
    ("POST", "/api/v1/auth/totp/disable"): "needs a TOTP code",
    ("POST", "/api/v1/auth/password"): "needs the current password",
    ("POST", "/api/v1/auth/reauthenticate"): "needs the current password",
    ("POST", "/api/v1/auth/verify-email"): "needs a mailed token",
    ("POST", "/api/v1/auth/password-reset/confirm"): "needs a mailed token",
    ("DELETE", "/api/v1/admin/connections/{id}"): "no WebSocket is open during the run",
    ("POST", "/api/v1/admin/keys/{kid}/retire"): "needs a kid that no longer signs",
    ("POST", "/api/v1/device/telemetry"): "devices post with their key, not the run's user token",
    ("POST", "/api/v1/firmware"): "needs an image with a manifest signed by the trusted key",
    ("POST", "/api/v1/firmware/{sha256}/links"): "needs the id of an existing device in its body",
    ("POST", "/api/v1/deployments"): "needs an existing image's SHA-256 and devices that can take it in its body",
    ("POST", "/api/v1/admin/jobs/{id}/retry"): "the prepared job is retryable only between the run's "
    "cancellation of it and the next periodic job taking its unique key (409 conflict after that)",
}


def successes(base_url):
    """(method, route) → how many 2xx answers the server has counted (its /metrics)."""
    counts = {}
    for line in requests.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[: line.rindex("}") + 1]))
        if labels["status"].startswith("2"):
            key = (labels["method"], labels["route"])
            counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def prepare_room(server):
    """A room owned by another user that the admin and a third user belong to, and a second
    session of the admin: leave, member removal and session revocation then have something to
    succeed on. Returns the room's, the member's and the session's ids."""
    base = server.base_url

    def account(email):
        password = "quiet harbour lantern nine"
        requests.post(f"{base}/api/v1/auth/register", json={"email": email, "password": password}, timeout=10)
        pair = requests.post(f"{base}/api/v1/auth/login", json={"email": email, "password": password}, timeout=10)
        return pair.json()["access_token"]

    owner = {"Authorization": f"Bearer {account('st.owner@example.com')}"}
    member = account("st.member@example.com")
    member_id = requests.get(f"{base}/api/v1/auth/me", headers={"Authorization": f"Bearer {member}"}, timeout=10).json()["id"]
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    room = requests.post(
        f"{base}/api/v1/rooms", headers=owner, json={"name": "fuzzed", "visibility": "public"}, timeout=10
    ).json()["id"]
    requests.post(f"{base}/api/v1/rooms/{room}/join", headers={"Authorization": f"Bearer {admin}"}, timeout=10).raise_for_status()
    requests.post(
        f"{base}/api/v1/rooms/{room}/members", headers=owner, json={"user_id": member_id, "role": "member"}, timeout=10
    ).raise_for_status()
    # A second session of the admin, for the run to revoke.
    sessions = requests.get(
        f"{base}/api/v1/auth/sessions", headers={"Authorization": f"Bearer {admin}"}, timeout=10
    ).json()
    session = next(s["id"] for s in sessions if s["current"])
    return room, member_id, session


def prepare_job(server):
    """The id of the periodic retention job that waits for its next run (an hour ahead, see
    conftest.py): the run reads it, cancels it and tries to retry it."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {admin}"}
    # The first run is due at start; its end enqueues the next one, which is what is wanted.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = requests.get(
            f"{base}/api/v1/admin/jobs",
            headers=headers,
            params={"state": "scheduled", "kind": "rooms.retention"},
            timeout=10,
        ).json()
        if page["items"]:
            return page["items"][0]["id"]
        time.sleep(0.1)
    raise AssertionError("no scheduled rooms.retention job appeared")


def prepare_firmware(server, binary):
    """A generic image signed with the CLI and uploaded; returns its SHA-256."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    image = Path(server.firmware_key).with_name("board.bin")
    image.write_bytes(bytes(range(256)) * 64)
    subprocess.run(
        [binary, "firmware", "sign", "--key", server.firmware_key, str(image), "--generic",
         "--version", "1.0.0", "--project", "schemathesis", "--target", "rp2040"],
        check=True,
        capture_output=True,
    )
    manifest = image.with_name("board.bin.manifest.json").read_bytes()
    stored = requests.post(
        f"{base}/api/v1/firmware?generic=true",
        headers={"Authorization": f"Bearer {admin}", "Unhidra-Manifest": base64.b64encode(manifest).decode()},
        data=image.read_bytes(),
        timeout=10,
    )
    assert stored.status_code == 201, stored.text
    return stored.json()["sha256"]


def prepare_deployments(server, firmware):
    """Three deployments of the image, each to a device of its own, scheduled months ahead: one
    for the run to pause, one paused for it to resume, one for it to cancel."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {admin}"}
    start_at = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=200)).isoformat()
    ids = []
    for name in ["pause", "resume", "cancel"]:
        device = requests.post(
            f"{base}/api/v1/devices", headers=headers, json={"name": f"st-ota-{name}", "model": "rp2040"}, timeout=10
        ).json()["device"]["id"]
        made = requests.post(
            f"{base}/api/v1/deployments",
            headers=headers,
            json={"firmware": firmware, "target": {"devices": [device]}, "start_at": start_at},
            timeout=10,
        )
        assert made.status_code == 201, made.text
        ids.append(made.json()["id"])
    paused = requests.post(f"{base}/api/v1/deployments/{ids[1]}/pause", headers=headers, timeout=10)
    assert paused.status_code == 200, paused.text
    return ids


def prepare_cron(server):
    """The name of a cron schedule for the run to delete."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    name = "st-prepared"
    requests.put(
        f"{base}/api/v1/admin/cron/{name}",
        headers={"Authorization": f"Bearer {admin}"},
        json={"expression": "0 4 * * *", "kind": "rooms.retention"},
        timeout=10,
    ).raise_for_status()
    return name


def prepare_file(server):
    """The id of a file of the admin's, shared by link, for the run to make links to."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    made = requests.post(
        f"{base}/api/v1/files",
        params={"name": "shared.txt", "access": "link"},
        headers={"Authorization": f"Bearer {admin}"},
        data=b"shared by link\n",
        timeout=10,
    )
    made.raise_for_status()
    return made.json()["id"]


def prepare_devices(server):
    """Two devices of the admin (one for the run to delete, one with a command that has
    expired), a provisioning token for the run to revoke, and an open alert of a third,
    which went silent: its inactivity timeout is the shortest allowed (10 s), and it was heard
    once, over HTTP. Returns the device ids, the alert's, the command's and the token's."""
    base = server.base_url
    admin = requests.post(
        f"{base}/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=10
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {admin}"}

    def device(name, **extra):
        made = requests.post(
            f"{base}/api/v1/devices", headers=headers, json={"name": name, "model": "esp32-s3", **extra}, timeout=10
        )
        made.raise_for_status()
        return made.json()

    kept = device("st-kept")["device"]["id"]
    # A command that expires in a second, so that reading it with `wait` answers at once.
    command = requests.post(
        f"{base}/api/v1/devices/{kept}/commands", headers=headers, json={"name": "noop", "ttl": 1}, timeout=10
    )
    command.raise_for_status()
    deleted = device("st-deleted")["device"]["id"]
    quiet = device("st-quiet", inactivity_timeout=10)
    requests.post(
        f"{base}/api/v1/device/telemetry",
        headers={"Authorization": f"Bearer {quiet['key']}"},
        json={"seq": 1, "points": [{"key": "temp", "value": 20.5}]},
        timeout=10,
    ).raise_for_status()
    token = requests.post(
        f"{base}/api/v1/provisioning-tokens", headers=headers, json={"model": "esp32-s3"}, timeout=10
    )
    token.raise_for_status()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = requests.get(
            f"{base}/api/v1/alerts", headers=headers, params={"device": quiet["device"]["id"]}, timeout=10
        ).json()
        if page["items"]:
            return kept, deleted, page["items"][0]["id"], command.json()["id"], token.json()["token"]["id"]
        time.sleep(0.2)
    raise AssertionError("the quiet device raised no alert")


def run_schemathesis(server, *paths, exclude=False, env=None):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    selection = []
    for path in paths:
        selection += ["--exclude-path" if exclude else "--include-path", path]
    result = subprocess.run(
        [
            str(schemathesis),
            "--config-file",
            str(HERE / "schemathesis.toml"),
            "run",
            f"{server.base_url}/api/v1/openapi.json",
            "--max-examples",
            "50",
            "--seed",
            "1",
            # One worker: with two threads, Hypothesis parses its lambdas' source concurrently,
            # and CPython 3.11's `ast` is not thread-safe ("AST constructor recursion depth
            # mismatch" ends the run at random).
            "--workers",
            "1",
            "--no-color",
            *selection,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "ST_ADMIN_EMAIL": ADMIN_EMAIL, "ST_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings are allowed: the password policy rejects most generated passwords by design.
    assert "❌" not in result.stdout and "🚫" not in result.stdout, result.stdout


def test_every_operation_conforms_to_the_document(server, server_binary):
    firmware = prepare_firmware(server, server_binary)
    to_pause, to_resume, to_cancel = prepare_deployments(server, firmware)
    room, member, session = prepare_room(server)
    job = prepare_job(server)
    cron = prepare_cron(server)
    device, deleted_device, alert, command, token = prepare_devices(server)
    shared_file = prepare_file(server)
    env = {
        "ST_FILE_ID": shared_file,
        "ST_TOKEN_ID": token,
        "ST_FIRMWARE_SHA": firmware,
        "ST_DEPLOYMENT_ID": to_pause,
        "ST_RESUME_ID": to_resume,
        "ST_CANCEL_ID": to_cancel,
        "ST_DEVICE_ID": device,
        "ST_DELETE_DEVICE_ID": deleted_device,
        "ST_ALERT_ID": alert,
        "ST_COMMAND_ID": command,
        "ST_ROOM_ID": room,
        "ST_MEMBER_ID": member,
        "ST_SESSION_ID": session,
        "ST_JOB_ID": job,
        "ST_CRON_NAME": cron,
    }
    before = successes(server.base_url)
    run_schemathesis(server, *SELF_HARMING, exclude=True, env=env)
    # The lists that supply ids to the self-harming operations run with them.
    run_schemathesis(server, *SELF_HARMING, "/api/v1/auth/users", "/api/v1/auth/sessions", env=env)
    after = successes(server.base_url)
    document = requests.get(f"{server.base_url}/api/v1/openapi.json", timeout=10).json()
    hollow = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in {"get", "post", "put", "patch", "delete"} or not operation.get("security"):
                continue
            key = (method.upper(), path)
            if key in NO_SUCCESS_EXPECTED:
                continue
            if after.get(key, 0) - before.get(key, 0) == 0:
                hollow.append(key)
    assert not hollow, f"authenticated operations that never succeeded during the run: {hollow}"


def test_problem_documents_from_outside(server):
    # A plain HTTP client sees the contract: problem+json with a trace id that matches the header.
    response = requests.post(
        f"{server.base_url}/health/live", headers={"x-request-id": "py-client-1"}, timeout=10
    )
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "method_not_allowed"
    assert body["trace_id"] == "py-client-1" == response.headers["x-request-id"]
    assert "GET" in response.headers["allow"]
