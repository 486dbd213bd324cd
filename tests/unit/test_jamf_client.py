"""The Jamf Pro client against the stand-in server (real HTTP on 127.0.0.1): tokens, renewal, 401."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from odst.config import ConfigError, Settings
from odst.jamf.client import Credentials, JamfAuthFailed, JamfClient, credentials
from odst.jamf.records import DistributionPoint, Wanted, dp_body, drift_kind, package_body, record_action
from tests.jamf_standin import CLIENT_ID, CLIENT_SECRET, PASSWORD, USER, JamfStandin


@pytest.fixture
def standin():
    server = JamfStandin(token_lifetime=1.5).start()
    yield server
    server.stop()
    assert server.errors == []  # every body ODST sent fits the SDK's models / Jamf's reference


def run(coro):
    return asyncio.run(coro)


def oauth(standin) -> JamfClient:
    return JamfClient(Credentials(url=standin.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))


def test_oauth_token_is_reused_while_fresh_and_renewed_before_expiry(standin):
    async def story():
        async with oauth(standin) as client:
            assert await client.version() == "11.20.0"
            assert await client.version() == "11.20.0"
            assert client.tokens_issued == 1
            # poll until the client itself decides the token is too old (a third of 1.5 s before expiry)
            while client._token.fresh(time.monotonic()):
                await asyncio.sleep(0.05)
            assert await client.version() == "11.20.0"
            assert client.tokens_issued == 2
            assert client.renewed_on_401 == 0  # renewed before expiry, never refused
    run(story())
    assert not any(status == 401 for _, _, status in standin.log)


def test_a_token_refused_mid_operation_is_renewed_once_and_the_call_succeeds(standin):
    async def story():
        async with oauth(standin) as client:
            await client.version()
            standin.revoke_tokens()  # Jamf Pro forgets every token (e.g. restarted)
            assert await client.version() == "11.20.0"
            assert client.renewed_on_401 == 1 and client.tokens_issued == 2
    run(story())
    assert ("GET", "/api/v1/jamf-pro-version", 401) in standin.log


def test_older_servers_oauth_path_is_the_fallback(standin):
    standin.new_oauth_404 = True
    async def story():
        async with oauth(standin) as client:
            assert await client.version() == "11.20.0"
    run(story())
    assert ("POST", "/api/oauth/token", 404) in standin.log and ("POST", "/api/v1/oauth/token", 200) in standin.log


def test_basic_account_gets_a_bearer_token(standin):
    async def story():
        async with JamfClient(Credentials(url=standin.url, user=USER, password=PASSWORD)) as client:
            assert await client.version() == "11.20.0"
    run(story())
    assert ("POST", "/api/v1/auth/token", 200) in standin.log


def test_wrong_credentials_say_which_setting_to_check(standin):
    async def story():
        async with JamfClient(Credentials(url=standin.url, client_id=CLIENT_ID, client_secret="wrong")) as client:
            await client.version()
    with pytest.raises(JamfAuthFailed, match="jamf_client_id"):
        run(story())


def test_secret_file_must_be_private(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("abc\n")
    os.chmod(secret, 0o644)
    s = Settings(jamf_url="https://jamf.example", jamf_client_id="id", jamf_client_secret_file=str(secret)).validate()
    with pytest.raises(ConfigError, match="chmod 600"):
        credentials(s)
    os.chmod(secret, 0o600)
    assert credentials(s).client_secret == "abc"


def test_package_body_keeps_an_admins_choices_and_sets_odsts():
    want = Wanted(name="App.pkg", blake3="b" * 64, size=10, hash_type="SHA_512", hash_value="ab" * 64,
                  notes="Managed by ODST: x")
    new = package_body(want)
    assert new["fileName"] == "App.pkg" and new["hashValue"] == "ab" * 64 and new["size"] == "10"
    existing = {**new, "id": "7", "categoryId": "3", "priority": 4, "notes": "hand-written", "hashValue": "old"}
    updated = package_body(want, existing)
    assert (updated["categoryId"], updated["priority"], updated["notes"]) == ("3", 4, "hand-written")
    assert updated["hashValue"] == "ab" * 64 and "id" not in updated
    assert record_action(want, None) == "create"
    assert record_action(want, existing) == "update"
    assert record_action(want, {**existing, "hashValue": "ab" * 64}) == "unchanged"
    assert drift_kind(want, None) == "missing"
    assert drift_kind(want, existing) == "hash_differs"
    assert drift_kind(None, existing) == "no_file"


def test_dp_body_from_a_public_url_with_a_path_prefix():
    dp = DistributionPoint(name="ODST a", public_url="https://dp.example.org:8443/odst", context="CasperShare")
    body = dp_body(dp)
    assert (body["serverName"], body["httpsPort"], body["httpsContext"]) == ("dp.example.org", 8443, "odst/CasperShare")
    assert dp.url == "https://dp.example.org:8443/odst/CasperShare"
