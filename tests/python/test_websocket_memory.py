"""A member who stops reading cannot make the server hold more than its queue bound: the
attack of a `resume` naming one room in many spellings, against a room of the longest messages
(16,384 four-byte characters: 64 KiB each), is answered with one bounded replay, and reading nothing
while asking for more ends with 1013. The server's peak RSS stays within the documented bound."""

import asyncio
import json
import random
import tempfile
import uuid

import requests
import websockets

from conftest import Server

PASSWORD = "maple orbit candle frost 42"
# The documented bound for this attack (README, "Rooms and realtime"): the server's peak
# resident memory stays under this, whatever the client asks for.
PEAK_RSS_BOUND_MIB = 128


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def closed_with(base, code):
    """How many connections the server has closed with `code` (its `/metrics`)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("ws_disconnects_total{") and f'code="{code}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def until_closed_with(base, code, deadline_seconds=60):
    """Waits, without reading any socket, until the server has closed a connection with `code`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_seconds
    while closed_with(base, code) == 0:
        assert loop.time() < end, f"no connection was closed with {code}"
        await asyncio.sleep(0.05)


def spellings(room, count):
    """`count` distinct spellings of one UUID: hyphenated, plain, braced, urn, in mixed case."""
    forms = [str(room), room.hex, "{" + str(room) + "}", "urn:uuid:" + str(room)]
    rng = random.Random(7)
    seen = set()
    while len(seen) < count:
        form = rng.choice(forms)
        seen.add("".join(c.upper() if rng.random() < 0.5 else c for c in form))
    return sorted(seen)


async def next_frame(ws):
    """The next frame that is not presence, and its size on the wire."""
    while True:
        text = await asyncio.wait_for(ws.recv(), 10)
        frame = json.loads(text)
        if frame["type"] != "presence":
            return frame, len(text.encode())


def test_a_reader_that_stops_cannot_make_the_server_hold_its_replies(server_binary):
    env = {"UNHIDRA_RATE_LIMIT_MESSAGES_PER_SEC": "0"}
    with tempfile.TemporaryDirectory() as data_dir:
        srv = Server(server_binary, data_dir, env)
        try:
            base = srv.base_url
            requests.post(f"{base}/api/v1/auth/register", json={"email": "mem@example.com", "password": PASSWORD}, timeout=10)
            token = requests.post(
                f"{base}/api/v1/auth/login", json={"email": "mem@example.com", "password": PASSWORD}, timeout=10
            ).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            room = requests.post(
                f"{base}/api/v1/rooms", headers=auth, json={"name": "long", "visibility": "public"}, timeout=10
            ).json()["id"]
            body = "\U0001F600" * 16 * 1024  # the longest body: 16,384 characters of four bytes
            with requests.Session() as http:
                for i in range(1000):
                    http.post(
                        f"{base}/api/v1/rooms/{room}/messages",
                        headers=auth,
                        json={"body": body, "client_msg_id": f"m{i}"},
                        timeout=10,
                    ).raise_for_status()
            before = peak_rss_mib(srv.proc.pid)
            url = base.replace("http://", "ws://") + "/ws"
            names = spellings(uuid.UUID(room), 1000)

            async def reader_that_keeps_up():
                # The same room in three spellings is one replay, named canonically.
                async with websockets.connect(url, subprotocols=["unhidra.v1.json", f"bearer.{token}"],
                                              max_size=None) as ws:
                    assert json.loads(await ws.recv())["type"] == "welcome"
                    await ws.send(json.dumps({"type": "resume", "rooms": {n: 0 for n in names[:3]}}))
                    replay, size = await next_frame(ws)
                    assert replay["type"] == "history" and replay["room"] == room
                    assert replay["more"] is True
                    assert 0 < size <= 1024 * 1024 + 1024, size
                    await ws.send(json.dumps({"type": "ping"}))
                    assert (await next_frame(ws))[0]["type"] == "pong", "one replay only"
                    # Past 100 names a resume is refused before any work.
                    await ws.send(json.dumps({"type": "resume", "rooms": {n: 0 for n in names[:101]}}))
                    refused, _ = await next_frame(ws)
                    assert refused["type"] == "error" and refused["code"] == "too_many_rooms", refused

            async def reader_that_stops():
                # max_queue=1: the client stops reading from the socket once one message waits.
                async with websockets.connect(url, subprotocols=["unhidra.v1.json", f"bearer.{token}"],
                                              max_queue=1, max_size=None) as ws:
                    resume = json.dumps({"type": "resume", "rooms": {n: 0 for n in names}})
                    assert len(resume) < 64 * 1024
                    await ws.send(resume)  # refused: too many names
                    await ws.send(json.dumps({"type": "resume", "rooms": {n: 0 for n in names[:100]}}))
                    for _ in range(40):
                        await ws.send(json.dumps({"type": "history", "room": room, "limit": 200}))
                    # Nothing is read until the server has given up on this client; then what
                    # it had written and the close frame arrive.
                    await until_closed_with(base, 1013)
                    try:
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
                    except websockets.exceptions.ConnectionClosed:
                        pass
                    return ws.close_code

            asyncio.run(reader_that_keeps_up())
            assert asyncio.run(asyncio.wait_for(reader_that_stops(), 90)) == 1013
            peak = peak_rss_mib(srv.proc.pid)
            assert peak < PEAK_RSS_BOUND_MIB, f"peak RSS {peak:.0f} MiB (before the attack {before:.0f} MiB)"
        finally:
            srv.stop()
