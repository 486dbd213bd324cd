"""Signing in to a real ``odst serve`` with directory accounts from a real slapd.

The directory (tests/ldap_server.py) maps odst-admins, odst-operators and
odst-auditors to roles; mallory is in no mapped group and is refused.
"""

from __future__ import annotations

import httpx

from tests.conftest import free_port
from tests.test_accounts import PW, browser, sign_in


def test_directory_users_sign_in_with_their_groups_role(make_site, slapd):
    site = make_site(env={**slapd.settings_env(), "ODST_ADMIN_PASSWORD": PW}).start()
    for name, role in (("alice", "admin"), ("bob", "operator"), ("carol", "auditor")):
        r = sign_in(site, name, f"{name}-pw")
        assert r.status_code == 200, r.text
        assert (r.json()["role"], r.json()["source"]) == (role, "ldap")
    assert sign_in(site, "alice", "alice-pw").json()["display_name"] == "Alice Admin"

    for name, password in (("mallory", "mallory-pw"), ("alice", "wrong"), ("nobody", "x"), ("alice", ""),
                           ("*", "alice-pw"), ("alice)(uid=*", "alice-pw")):
        r = sign_in(site, name, password)
        assert r.status_code == 401 and r.json()["detail"] == "user name or password is wrong", (name, r.text)

    # What a directory user does is recorded as them.
    bob, csrf = browser(site, "bob", "bob-pw")
    assert bob.put("/api/v1/packages/tool.pkg", content=b"tool", headers={"X-CSRF-Token": csrf}).status_code == 201
    carol, csrf = browser(site, "carol", "carol-pw")
    assert carol.get("/api/v1/packages/tool.pkg").json()["uploaded_by"] == "ldap:bob"
    assert carol.delete("/api/v1/packages/tool.pkg", headers={"X-CSRF-Token": csrf}).status_code == 403
    assert carol.get("/api/v1/settings").json()["ldap"]["configured"] is True
    assert carol.post("/api/v1/settings/ldap-check", headers={"X-CSRF-Token": csrf}).status_code == 403
    alice, alice_csrf = browser(site, "alice", "alice-pw")
    r = alice.post("/api/v1/settings/ldap-check", headers={"X-CSRF-Token": alice_csrf})
    assert r.status_code == 200 and r.json()["detail"].startswith("ok"), r.text

    # A local user of the same name comes first.
    admin, csrf = browser(site, "admin", PW)
    r = admin.post("/api/v1/users", json={"username": "carol", "password": PW, "role": "operator"},
                   headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    assert sign_in(site, "carol", "carol-pw").status_code == 401
    assert sign_in(site, "carol", PW).json()["source"] == "local"


def test_an_unreachable_directory_is_a_503_and_not_a_failed_guess(make_site, slapd):
    dead = f"ldap://127.0.0.1:{free_port()}"
    site = make_site(env={**slapd.settings_env(), "ODST_LDAP_URL": dead, "ODST_LDAP_TIMEOUT_S": "1",
                          "ODST_SIGNIN_MAX_FAILURES": "2", "ODST_ADMIN_PASSWORD": PW}).start()
    for _ in range(3):
        r = sign_in(site, "alice", "alice-pw")
        assert r.status_code == 503 and r.json()["error"] == "directory_unavailable", r.text
    # Outages do not lock anyone out, and local users still sign in.
    assert sign_in(site, "admin", PW).status_code == 200
    admin, csrf = browser(site, "admin", PW)
    r = admin.post("/api/v1/settings/ldap-check", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 503 and dead.split("//")[1] in r.json()["detail"], r.text
    r = httpx.get(f"{site.url}/healthz", timeout=10)
    assert r.status_code == 200
