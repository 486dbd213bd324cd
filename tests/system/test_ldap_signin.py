"""Signing in to a real ``odst serve`` with directory accounts from a real slapd.

The directory (tests/ldap_server.py) maps odst-admins, odst-operators and
odst-auditors to roles; mallory is in no mapped group and is refused.
"""

from __future__ import annotations

import httpx

from tests.conftest import free_port, wait_until
from tests.system.test_accounts import PW, browser, sign_in


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


def _modify_group(slapd, group: str, add: str | None = None, delete: str | None = None) -> None:
    import ldap3
    conn = ldap3.Connection(ldap3.Server(slapd.url, get_info=ldap3.NONE, connect_timeout=5),
                            user=slapd.admin_dn, password=slapd.admin_password, auto_bind=True)
    try:
        changes = {}
        if add:
            changes.setdefault("member", []).append((ldap3.MODIFY_ADD, [f"uid={add},ou=people,{slapd.base}"]))
        if delete:
            changes.setdefault("member", []).append((ldap3.MODIFY_DELETE, [f"uid={delete},ou=people,{slapd.base}"]))
        assert conn.modify(f"cn={group},ou=groups,{slapd.base}", changes), conn.result
    finally:
        conn.unbind()


def test_directory_group_changes_reach_open_sessions(make_site, slapd):
    site = make_site(env={**slapd.settings_env(), "ODST_LDAP_RECHECK_S": "1"}).start()
    bob, csrf = browser(site, "bob", "bob-pw")
    assert bob.get("/api/v1/session").json()["role"] == "operator"
    try:
        # bob moves from the operators to the auditors: his open session follows
        _modify_group(slapd, "odst-auditors", add="bob")
        _modify_group(slapd, "odst-operators", add="mallory", delete="bob")  # a group keeps one member
        wait_until(lambda: bob.get("/api/v1/session").json()["role"] == "auditor", 30,
                   what="the session to take the directory's new role")
        assert bob.put("/api/v1/packages/x.pkg", content=b"x", headers={"X-CSRF-Token": csrf}).status_code == 403
        # out of every mapped group: the session ends
        _modify_group(slapd, "odst-auditors", delete="bob")
        wait_until(lambda: bob.get("/api/v1/packages").status_code == 401, 30, what="the session to end")
        assert sign_in(site, "bob", "bob-pw").status_code == 401
    finally:
        _modify_group(slapd, "odst-operators", add="bob")
        _modify_group(slapd, "odst-operators", delete="mallory")
        try:
            _modify_group(slapd, "odst-auditors", delete="bob")
        except AssertionError:
            pass  # already out
