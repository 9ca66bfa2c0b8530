"""Headless Chromium opens /docs: the API explorer renders from assets in the binary, under the
page's Content-Security-Policy, with no network beyond the server."""

import shutil
import subprocess
import tempfile


def test_the_api_explorer_renders_in_a_browser(server):
    chromium = shutil.which("chromium")
    assert chromium, "scripts/test installs chromium"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"{server.base_url}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    # Swagger UI built the page from the OpenAPI document: operations are in the DOM.
    assert "swagger-ui" in dom
    assert "/api/v1/auth/login" in dom, dom[-2000:]
    assert "/health/ready" in dom
