"""pyotp, an independent TOTP implementation, enrols and logs in the way an authenticator app
would."""

import time

import pyotp
import requests

PASSWORD = "maple orbit candle frost 42"


def test_enrol_and_log_in_with_pyotp_codes(server):
    base = server.base_url
    email = "otp.user@example.com"
    created = requests.post(f"{base}/api/v1/auth/register", json={"email": email, "password": PASSWORD}, timeout=10)
    assert created.status_code == 201, created.text
    pair = requests.post(f"{base}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10).json()
    auth = {"Authorization": f"Bearer {pair['access_token']}"}

    setup = requests.post(f"{base}/api/v1/auth/totp/setup", headers=auth, timeout=10).json()
    parsed = pyotp.parse_uri(setup["otpauth_uri"])
    assert parsed.secret == setup["secret"]
    assert parsed.issuer == "Unhidra" and parsed.name == email
    assert parsed.digits == 6 and parsed.interval == 30
    totp = pyotp.TOTP(setup["secret"])
    # Enrol with the previous step's code (one step of drift is allowed), so that the current
    # step's code is still unused for the login below.
    previous = totp.at(time.time() - 30)
    enabled = requests.post(f"{base}/api/v1/auth/totp/enable", headers=auth, json={"code": previous}, timeout=10)
    assert enabled.status_code == 200, enabled.text
    assert len(enabled.json()["recovery_codes"]) == 10

    challenge = requests.post(f"{base}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10).json()
    assert challenge["mfa_required"] is True
    code = totp.now()
    done = requests.post(
        f"{base}/api/v1/auth/login/mfa", json={"mfa_token": challenge["mfa_token"], "code": code}, timeout=10
    )
    assert done.status_code == 200, done.text
    assert done.json()["token_type"] == "Bearer"

    # The same code is refused on a second login: no replay.
    again = requests.post(f"{base}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10).json()
    replay = requests.post(
        f"{base}/api/v1/auth/login/mfa", json={"mfa_token": again["mfa_token"], "code": code}, timeout=10
    )
    assert replay.status_code == 422
    assert replay.json()["errors"][0]["code"] == "wrong_code"
