"""boto3, an independent S3 client, checks what Unhidra keeps in an S3 bucket: each uploaded
file is one object under the documented key `<owner>/<yyyy>/<mm>/<dd>/<id>` with exactly the
uploaded bytes (multipart past 8 MiB included), and deleting the file removes the object.

Runs against the moto server that scripts/test starts (`UNHIDRA_TEST_S3_URL`)."""

import datetime
import os
import re
import tempfile
import uuid

import boto3
import botocore.exceptions
import pytest
import requests

from conftest import Server

SECRET = "unhidra-python-s3-secret"

# A 1×1 PNG: its first bytes make the upload an image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000"
    "000d49444154789c6360000200000500010d0a2db40000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def s3_url():
    url = os.environ.get("UNHIDRA_TEST_S3_URL")
    if not url:
        pytest.fail("UNHIDRA_TEST_S3_URL must name an S3 API server (scripts/test starts moto)")
    return url


@pytest.fixture(scope="module")
def bucket(s3_url):
    client = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id="python-test",
        aws_secret_access_key=SECRET,
    )
    name = f"unhidra-py-{uuid.uuid4().hex}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="module")
def s3_server(server_binary, s3_url, bucket):
    _, name = bucket
    env = {
        "UNHIDRA_ADMIN_EMAIL": "s3@example.com",
        "UNHIDRA_ADMIN_PASSWORD": "velvet thunder quietly seven lamps",
        "UNHIDRA_STORAGE_BACKEND": "s3",
        "UNHIDRA_S3_ENDPOINT": s3_url,
        "UNHIDRA_S3_BUCKET": name,
        "UNHIDRA_S3_ACCESS_KEY_ID": "python-test",
        "UNHIDRA_S3_SECRET_ACCESS_KEY": SECRET,
        "UNHIDRA_LOG": "debug",
    }
    with tempfile.TemporaryDirectory() as data_dir:
        srv = Server(server_binary, data_dir, env)
        yield srv
        assert srv.stop() == 0, srv.lines


def admin(server):
    response = requests.post(
        f"{server.base_url}/api/v1/auth/login",
        json={"email": "s3@example.com", "password": "velvet thunder quietly seven lamps"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    me = requests.get(
        f"{server.base_url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert me.status_code == 200, me.text
    return token, me.json()["id"]


def upload(server, token, name, body):
    response = requests.post(
        f"{server.base_url}/api/v1/files",
        params={"name": name},
        headers={"Authorization": f"Bearer {token}"},
        data=body,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return response.json()


def keys(client, name):
    listed = client.list_objects_v2(Bucket=name)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_files_are_objects_under_owner_and_day_and_deleting_removes_them(s3_server, bucket):
    client, name = bucket
    token, owner = admin(s3_server)
    small = upload(s3_server, token, "dot.png", PNG)
    # Past one part: written as a multipart upload.
    big_body = PNG + bytes(i % 251 for i in range(9 * 1024 * 1024))
    big = upload(s3_server, token, "survey.png", big_body)

    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y/%m/%d")
    owner_part = owner.replace("-", "")
    expected = {f"{owner_part}/{day}/{f['id'].replace('-', '')}": f for f in (small, big)}
    assert sorted(keys(client, name)) == sorted(expected)
    for key in expected:
        assert re.fullmatch(r"[0-9a-f]{32}/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}", key), key
    small_key, big_key = list(expected)
    assert client.get_object(Bucket=name, Key=small_key)["Body"].read() == PNG
    stored = client.get_object(Bucket=name, Key=big_key)
    assert stored["ContentLength"] == len(big_body)
    assert stored["Body"].read() == big_body

    # The server's ranges are the bucket's bytes.
    headers = {"Authorization": f"Bearer {token}", "Range": "bytes=8388600-8388615"}
    part = requests.get(f"{s3_server.base_url}/api/v1/files/{big['id']}/content", headers=headers, timeout=10)
    assert part.status_code == 206
    ranged = client.get_object(Bucket=name, Key=big_key, Range="bytes=8388600-8388615")
    assert part.content == ranged["Body"].read() == big_body[8388600:8388616]

    deleted = requests.delete(
        f"{s3_server.base_url}/api/v1/files/{big['id']}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert deleted.status_code == 204
    assert keys(client, name) == [small_key]
    with pytest.raises(botocore.exceptions.ClientError) as gone:
        client.head_object(Bucket=name, Key=big_key)
    assert gone.value.response["Error"]["Code"] == "404"


def test_a_refused_upload_leaves_no_object_and_the_secret_is_never_logged(s3_server, bucket):
    client, name = bucket
    token, _ = admin(s3_server)
    before = keys(client, name)
    response = requests.post(
        f"{s3_server.base_url}/api/v1/files",
        params={"name": "notes.png"},
        headers={"Authorization": f"Bearer {token}"},
        data=b"plain text, not a picture",
        timeout=10,
    )
    assert response.status_code == 415
    assert response.json()["code"] == "type_mismatch"
    assert keys(client, name) == before
    ready = requests.get(f"{s3_server.base_url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert not any(SECRET in str(line) for line in s3_server.lines)
