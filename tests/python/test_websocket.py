"""Python `websockets`, an independent client, uses the gateway the way browsers and firmware
do: both subprotocol styles, join, send, receive, and resume after a drop with no gap and no
duplicate."""

import asyncio
import json

import requests
import websockets

PASSWORD = "maple orbit candle frost 42"


def account(server, email):
    requests.post(f"{server.base_url}/api/v1/auth/register", json={"email": email, "password": PASSWORD}, timeout=10)
    pair = requests.post(
        f"{server.base_url}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10
    ).json()
    return pair["access_token"]


async def frame(ws, wanted):
    """The next frame of the wanted type (presence frames in between are skipped)."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        if message["type"] == wanted:
            return message
        assert message["type"] == "presence", message


def test_both_subprotocol_styles_join_send_and_resume(server):
    token = account(server, "py.ws@example.com")
    room = requests.post(
        f"{server.base_url}/api/v1/rooms",
        headers={"Authorization": f"Bearer {token}"},
        json={"name": "py-lobby", "visibility": "public"},
        timeout=10,
    ).json()["id"]
    url = server.base_url.replace("http://", "ws://") + "/ws"

    async def scenario():
        # The browser style: the protocol name plus the token; the name is echoed.
        async with websockets.connect(url, subprotocols=["unhidra.v1.json", f"bearer.{token}"]) as browser:
            assert browser.subprotocol == "unhidra.v1.json"
            await frame(browser, "welcome")
            await browser.send(json.dumps({"type": "join", "room": room}))
            # The firmware style: a lone token, echoed as it came.
            async with websockets.connect(url, subprotocols=[token]) as device:
                assert device.subprotocol == token
                await frame(device, "welcome")
                await device.send(json.dumps({"type": "join", "room": room}))
                await device.send(json.dumps({"type": "ping"}))
                await frame(device, "pong")
                await browser.send(
                    json.dumps({"type": "send", "room": room, "body": "from python", "client_msg_id": "py-1"})
                )
                ack = await frame(browser, "ack")
                delivered = await frame(device, "message")
                assert delivered["id"] == ack["id"] and delivered["body"] == "from python"
            last_seen = ack["id"]

        # While away, three messages are posted; resume brings exactly those, in order.
        for i in range(3):
            requests.post(
                f"{server.base_url}/api/v1/rooms/{room}/messages",
                headers={"Authorization": f"Bearer {token}"},
                json={"body": f"missed {i}", "client_msg_id": f"py-away-{i}"},
                timeout=10,
            ).raise_for_status()
        async with websockets.connect(url, subprotocols=["unhidra.v1.json", f"bearer.{token}"]) as back:
            await frame(back, "welcome")
            await back.send(json.dumps({"type": "resume", "rooms": {room: last_seen}}))
            replay = await frame(back, "history")
            assert [m["body"] for m in replay["messages"]] == ["missed 0", "missed 1", "missed 2"]
            await back.send(json.dumps({"type": "send", "room": room, "body": "after", "client_msg_id": "py-2"}))
            await frame(back, "ack")
            live = await frame(back, "message")
            assert live["body"] == "after"
            assert live["id"] > replay["messages"][-1]["id"]

    asyncio.run(scenario())


def test_a_bad_token_is_refused_before_the_upgrade(server):
    url = server.base_url.replace("http://", "ws://") + "/ws"

    async def scenario():
        try:
            async with websockets.connect(url, subprotocols=["unhidra.v1.json", "bearer.forged"]):
                raise AssertionError("the upgrade should have been refused")
        except websockets.exceptions.InvalidStatus as refused:
            assert refused.response.status_code == 401

    asyncio.run(scenario())


async def keep_sending_until_closed(ws, frames):
    """Sends `frames` (an iterator of text frames) until the server closes; returns the close
    code the client received (1006 when no close frame arrived). Bounded: at most 100,000
    frames or 20 seconds."""
    async def flood():
        for i, text in zip(range(100_000), frames):
            await ws.send(text)
            if i % 200 == 0:
                await asyncio.sleep(0)  # lets the client read what the server sends

    try:
        await asyncio.wait_for(flood(), timeout=20)
        await asyncio.wait_for(ws.wait_closed(), timeout=10)
    except websockets.exceptions.ConnectionClosed:
        pass
    return ws.close_code


def test_a_client_still_sending_gets_the_documented_close_code(server):
    """After its close frame the server reads and drops what the client still sends until the
    client answers, so the close frame is not destroyed by a TCP reset: a flood ends with 4029
    (rate limit), an oversize frame with 1009, not with 1006."""
    token = account(server, "py.flood@example.com")
    url = server.base_url.replace("http://", "ws://") + "/ws"
    protocols = ["unhidra.v1.json", f"bearer.{token}"]

    def pings():
        while True:
            yield json.dumps({"type": "ping"})

    async def scenario():
        # max_queue=None: the client keeps reading whatever the server sends, so that only the
        # rate limit, not a full queue, can end the connection.
        async with websockets.connect(url, subprotocols=protocols, max_queue=None) as ws:
            await frame(ws, "welcome")
            assert await keep_sending_until_closed(ws, pings()) == 4029

        async with websockets.connect(url, subprotocols=protocols, max_queue=None, max_size=None) as ws:
            await frame(ws, "welcome")

            def oversize_then_pings():
                yield "x" * (64 * 1024 + 1)  # past ws_max_frame_bytes' default
                yield from pings()

            assert await keep_sending_until_closed(ws, oversize_then_pings()) == 1009

    asyncio.run(scenario())
