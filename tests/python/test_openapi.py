"""Schemathesis, an independent client, checks every operation against the OpenAPI document."""

import os
import subprocess
import sys
from pathlib import Path

import requests

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD

HERE = Path(__file__).parent


def test_every_operation_conforms_to_the_document(server):
    schemathesis = Path(sys.executable).with_name("schemathesis")
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
            "--workers",
            "2",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "ST_ADMIN_EMAIL": ADMIN_EMAIL, "ST_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings are allowed: the password policy rejects most generated passwords by design.
    assert "❌" not in result.stdout and "🚫" not in result.stdout, result.stdout


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
