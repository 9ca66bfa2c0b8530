"""PyJWT, an independent implementation, verifies Unhidra's access tokens against its JWKS."""

import jwt
import pytest
import requests

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD


def login(server, email=ADMIN_EMAIL, password=ADMIN_PASSWORD):
    response = requests.post(
        f"{server.base_url}/api/v1/auth/login",
        json={"email": email, "password": password},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def verify(server, token, **options):
    jwks = jwt.PyJWKClient(f"{server.base_url}/.well-known/jwks.json")
    key = jwks.get_signing_key_from_jwt(token)
    return jwt.decode(token, key, algorithms=["EdDSA"], audience="unhidra", issuer="unhidra", **options)


def test_access_tokens_verify_against_the_jwks(server):
    pair = login(server)
    header = jwt.get_unverified_header(pair["access_token"])
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "at+jwt"
    claims = verify(server, pair["access_token"])
    assert claims["role"] == "admin"
    for claim in ("sub", "sid", "iat", "exp", "jti"):
        assert claim in claims
    assert claims["exp"] - claims["iat"] == pair["expires_in"]


def test_a_wrong_audience_is_refused_by_pyjwt_too(server):
    pair = login(server)
    with pytest.raises(jwt.InvalidAudienceError):
        jwks = jwt.PyJWKClient(f"{server.base_url}/.well-known/jwks.json")
        key = jwks.get_signing_key_from_jwt(pair["access_token"])
        jwt.decode(pair["access_token"], key, algorithms=["EdDSA"], audience="someone-else")


def test_a_token_pyjwt_forges_is_refused(server):
    # HS256 with the server's public key as the secret: the classic algorithm confusion.
    pair = login(server)
    claims = jwt.decode(pair["access_token"], options={"verify_signature": False})
    kid = jwt.get_unverified_header(pair["access_token"])["kid"]
    x = requests.get(f"{server.base_url}/.well-known/jwks.json", timeout=10).json()["keys"][0]["x"]
    forged = jwt.encode(claims, x, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"})
    response = requests.get(
        f"{server.base_url}/api/v1/auth/me", headers={"Authorization": f"Bearer {forged}"}, timeout=10
    )
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_token"


def test_tokens_verify_before_and_after_a_key_rotation(server):
    before = login(server)
    old_kid = jwt.get_unverified_header(before["access_token"])["kid"]
    auth = {"Authorization": f"Bearer {before['access_token']}"}
    rotated = requests.post(f"{server.base_url}/api/v1/admin/keys/rotate", headers=auth, timeout=10)
    assert rotated.status_code == 201, rotated.text
    new_kid = rotated.json()["kid"]
    assert new_kid != old_kid

    after = login(server)
    assert jwt.get_unverified_header(after["access_token"])["kid"] == new_kid
    # Both verify against the published key set: no one is logged out by a rotation.
    assert verify(server, before["access_token"])["sub"] == verify(server, after["access_token"])["sub"]

    # Once the old key is retired, it leaves the key set and its tokens stop working.
    new_auth = {"Authorization": f"Bearer {after['access_token']}"}
    retired = requests.post(
        f"{server.base_url}/api/v1/admin/keys/{old_kid}/retire", headers=new_auth, timeout=10
    )
    assert retired.status_code == 204, retired.text
    with pytest.raises(jwt.PyJWKClientError):
        verify(server, before["access_token"])
    me = requests.get(f"{server.base_url}/api/v1/auth/me", headers=auth, timeout=10)
    assert me.status_code == 401
