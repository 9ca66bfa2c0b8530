"""Python `websockets`, an independent client, speaks the device protocol: a device registered
over HTTP connects with its key the ways firmware does, says hello, has its telemetry batches
acknowledged once they are durable (a repeat is acknowledged again, stored once), gets every
malformed frame answered with its code, and is closed with 4003 when its key is revoked."""

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


async def reply(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=10))


def test_a_device_speaks_the_protocol_and_is_revoked(server):
    token = account(server, "py.device@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    made = requests.post(
        f"{server.base_url}/api/v1/devices",
        headers=headers,
        json={"name": "py-sensor", "model": "esp32-c3", "tags": ["python"]},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    device, key = made.json()["device"]["id"], made.json()["key"]
    assert key.startswith("unh_dk_")
    url = server.base_url.replace("http://", "ws://") + "/ws"

    async def scenario():
        # The firmware style: the key as the lone subprotocol, echoed as it came.
        async with websockets.connect(url, subprotocols=[key]) as lone:
            assert lone.subprotocol == key
            assert (await reply(lone))["type"] == "welcome"
        async with websockets.connect(url, subprotocols=["unhidra.device.v1", f"key.{key}"]) as ws:
            assert ws.subprotocol == "unhidra.device.v1"
            welcome = await reply(ws)
            assert welcome == {"type": "welcome", "connection": welcome["connection"], "device": device}
            await ws.send(json.dumps({"type": "heartbeat", "uptime": 3}))
            assert (await reply(ws))["code"] == "hello_required"
            await ws.send(json.dumps({"type": "hello", "firmware": "0.9.1", "reset_reason": "power_on"}))
            await ws.send(json.dumps({"type": "heartbeat", "uptime": 4, "battery": 97.5}))
            batch = {"type": "telemetry", "seq": 41, "points": [{"key": "humidity", "value": 48.25}]}
            await ws.send(json.dumps(batch))
            assert await reply(ws) == {"type": "ack", "seq": 41}
            await ws.send(json.dumps(batch))
            assert await reply(ws) == {"type": "ack", "seq": 41, "duplicate": True}
            for frame, code in [
                ("[1, 2]", "not_an_object"),
                ('{"seq": 1}', "missing_type"),
                ('{"type": "dance"}', "unknown_type"),
                ('{"type": "telemetry", "points": []}', "missing_field"),
                ('{"type": "telemetry", "seq": 42, "points": [{"key": "k", "value": {"shape": [2], "dtype": "f32", "data": [1]}}]}', "array_length_mismatch"),
            ]:
                await ws.send(frame)
                answer = await reply(ws)
                assert (answer["type"], answer["code"]) == ("error", code), (frame, answer)
            latest = requests.get(f"{server.base_url}/api/v1/devices/{device}/telemetry/latest", headers=headers, timeout=10).json()
            assert [(p["key"], p["value"]) for p in latest] == [("humidity", 48.25)]
            shown = requests.get(f"{server.base_url}/api/v1/devices/{device}", headers=headers, timeout=10).json()
            assert (shown["status"], shown["firmware"]) == ("online", "0.9.1")

            revoked = requests.post(f"{server.base_url}/api/v1/devices/{device}/revoke", headers=headers, timeout=10)
            assert revoked.status_code == 200
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), timeout=10)
            except websockets.exceptions.ConnectionClosed as closed:
                assert closed.rcvd.code == 4003
        try:
            async with websockets.connect(url, subprotocols=["unhidra.device.v1", f"key.{key}"]):
                raise AssertionError("a revoked key must be refused")
        except websockets.exceptions.InvalidStatus as refused:
            assert refused.response.status_code == 401

    asyncio.run(scenario())
