"""Local users, web UI sessions, CSRF and sign-in rate limiting, against a real ``odst serve``.

Session expiry and the failure window are also checked on the store directly, with
explicit clocks, so no test waits for real minutes to pass.
"""

from __future__ import annotations

import json
import os
import stat
import threading

import httpx
import pytest

from odst.accounts import passwords
from odst.accounts.sessions import SessionStore
from odst.events.signing import SiteKey
from tests.conftest import module_site, run_odst, wait_until

PW = "correct horse battery"


def sign_in(site, username: str, password: str, **kw) -> httpx.Response:
    return httpx.post(f"{site.url}/api/v1/session", json={"username": username, "password": password},
                      timeout=30, **kw)


def browser(site, username: str, password: str) -> tuple[httpx.Client, str]:
    """A cookie-carrying client signed in as ``username``, and its CSRF token."""
    c = httpx.Client(base_url=site.url, timeout=30)
    r = c.post("/api/v1/session", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return c, r.json()["csrf_token"]


def user_events(admin: httpx.Client) -> list[dict]:
    r = admin.get("/api/v1/events", params={"limit": 1000})
    return [e for e in r.json()["events"] if e["type"].startswith("User")]


def test_first_start_creates_an_admin_user_shown_once(make_site):
    site = make_site().start()
    path = site.data / "admin-password"
    password = path.read_text().strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert password in site.log()  # printed once, at first start

    r = sign_in(site, "admin", password)
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "admin" and r.json()["source"] == "local"
    with site.client() as admin:
        created = user_events(admin)
    assert [(e["type"], e["actor"]) for e in created] == [("UserCreated", "system")]
    # the log carries the argon2id hash sealed: no peer or auditor gets a guessing target
    assert "$argon2" not in json.dumps(created)
    # the suite's test-only knob (tests/conftest.py): argon2's smallest parameters
    assert _admin_hash(site).startswith("$argon2id$v=19$m=8,t=1,p=1$")


def test_users_are_events_and_changes_reach_open_sessions(site):
    admin = site.client()
    r = admin.post("/api/v1/users", json={"username": "olga", "password": PW, "role": "operator",
                                          "display_name": "Olga Operator"})
    assert r.status_code == 201, r.text
    assert r.json()["role"] == "operator" and r.json()["created_by"].startswith("token:")
    assert admin.post("/api/v1/users", json={"username": "OLGA", "password": PW}).status_code == 409

    olga, csrf = browser(site, "olga", PW)
    assert olga.get("/api/v1/session").json()["display_name"] == "Olga Operator"
    assert olga.put("/api/v1/packages/a.pkg", content=b"a", headers={"X-CSRF-Token": csrf}).status_code == 201
    assert olga.get("/api/v1/users").status_code == 403  # an operator manages no users

    # A role change applies to the open session at once; the actor is recorded.
    assert admin.patch("/api/v1/users/olga", json={"role": "auditor"}).json()["role"] == "auditor"
    r = olga.put("/api/v1/packages/b.pkg", content=b"b", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403, r.text
    assert olga.get("/api/v1/packages").status_code == 200

    # A new password ends every session begun before it.
    assert admin.patch("/api/v1/users/olga", json={"password": PW + "!"}).status_code == 200
    assert olga.get("/api/v1/packages").status_code == 401
    assert sign_in(site, "olga", PW).status_code == 401
    olga, csrf = browser(site, "olga", PW + "!")

    # Removal ends them too, and the name can no longer sign in.
    assert admin.delete("/api/v1/users/olga").json() == {"removed": "olga"}
    assert olga.get("/api/v1/packages").status_code == 401
    assert sign_in(site, "olga", PW + "!").status_code == 401
    assert admin.get("/api/v1/users/olga").status_code == 404

    types = [(e["type"], e["actor"].split(":")[0]) for e in user_events(admin)]
    assert types == [("UserCreated", "system"), ("UserCreated", "token"), ("UserRoleChanged", "token"),
                     ("UserPasswordChanged", "token"), ("UserRemoved", "token")]
    r = run_odst("audit", "--data", str(site.data))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_last_admin_cannot_be_demoted_or_removed(site):
    admin = site.client()
    r = admin.patch("/api/v1/users/admin", json={"role": "operator"})
    assert r.status_code == 400 and "last admin" in r.json()["detail"]
    assert admin.delete("/api/v1/users/admin").status_code == 400
    assert admin.post("/api/v1/users", json={"username": "root2", "password": PW, "role": "admin"}).status_code == 201
    assert admin.patch("/api/v1/users/admin", json={"role": "auditor"}).json()["role"] == "auditor"


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory):
    """One site for the many small refusal cases below: each asserts it changed nothing."""
    with module_site(tmp_path_factory, "accounts") as s:
        yield s


@pytest.mark.parametrize("body, status", [
    ({"username": "../etc", "password": PW}, 400),
    ({"username": "a\x00b", "password": PW}, 400),
    ({"username": "x" * 65, "password": PW}, 400),
    ({"username": "shorty", "password": "short"}, 400),
    ({"username": "same-name", "password": "same-name"}, 400),
    ({"username": "ok", "password": PW, "role": "root"}, 400),
    ({"username": "ok", "password": PW, "display_name": "bell\x07"}, 400),
    ({"username": "ok", "password": PW, "extra": 1}, 400),
])
def test_bad_user_input_is_refused_and_creates_nothing(shared_site, body, status):
    admin = shared_site.client()
    r = admin.post("/api/v1/users", json=body)
    assert r.status_code == status and r.json()["detail"], r.text
    assert [u["username"] for u in admin.get("/api/v1/users").json()["users"]] == ["admin"]


def test_session_cookie_csrf_and_sign_out(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW}).start()
    r = sign_in(site, "admin", PW)
    cookie = r.headers["set-cookie"]
    assert "odst_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert "Secure" not in cookie  # plain http with cookie_secure=auto: a Secure cookie would never come back
    assert "$argon2" not in r.text and "password" not in r.json()

    c, csrf = browser(site, "admin", PW)
    assert c.get("/api/v1/session").json()["csrf_token"] == csrf
    # Reading needs only the cookie; changing anything needs the CSRF token as well.
    assert c.get("/api/v1/packages").status_code == 200
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        r = c.put("/api/v1/packages/x.pkg", content=b"x", headers=headers)
        assert r.status_code == 403 and r.json()["error"] == "csrf_failed", r.text
    r = c.put("/api/v1/packages/x.pkg", content=b"x",
              headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "origin" in r.json()["detail"]
    r = c.put("/api/v1/packages/x.pkg", content=b"x", headers={"X-CSRF-Token": csrf, "Origin": site.url})
    assert r.status_code == 201, r.text
    with site.client() as admin:
        assert admin.get("/api/v1/packages/x.pkg").json()["uploaded_by"] == "user:admin"

    old = c.cookies.get("odst_session")
    assert c.delete("/api/v1/session", headers={"X-CSRF-Token": csrf}).status_code == 200
    r = httpx.get(f"{site.url}/api/v1/packages", cookies={"odst_session": old})
    assert r.status_code == 401 and "sign in" in r.json()["detail"]


def test_own_password_change_keeps_this_session_and_ends_the_others(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW}).start()
    a, csrf = browser(site, "admin", PW)
    b, _ = browser(site, "admin", PW)
    r = a.post("/api/v1/session/password", json={"current": "nope-nope-nope", "new": PW + "2"},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401
    r = a.post("/api/v1/session/password", json={"current": PW, "new": PW + "2"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert a.get("/api/v1/packages").status_code == 200
    assert b.get("/api/v1/packages").status_code == 401
    assert sign_in(site, "admin", PW + "2").status_code == 200


def test_sign_in_is_rate_limited_per_user_and_per_address(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW, "ODST_SIGNIN_MAX_FAILURES": "3",
                          "ODST_SIGNIN_MAX_FAILURES_ADDRESS": "6"}).start()
    for _ in range(3):
        r = sign_in(site, "admin", "wrong password")
        assert r.status_code == 401 and r.json()["detail"] == "user name or password is wrong"
    # Locked: even the right password is refused until the window passes.
    r = sign_in(site, "admin", PW)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, r.text
    # An unknown name fails exactly like a wrong password (no user enumeration)...
    r = sign_in(site, "nobody", "wrong password")
    assert r.status_code == 401 and r.json()["detail"] == "user name or password is wrong"
    for name in ("n1", "n2"):
        assert sign_in(site, name, "wrong password").status_code == 401
    # ...and the address limit (6 failures here) stops guessing across many names.
    assert sign_in(site, "someone-else", "any password").status_code == 429


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"username": "admin"}', b'{"username": 1, "password": 2}',
                                     json.dumps({"username": "a" * 100_000, "password": "x"}).encode(),
                                     json.dumps({"username": "admin\x00", "password": "x"}).encode()])
def test_malformed_sign_in_is_a_clear_4xx(shared_site, content):
    r = httpx.post(f"{shared_site.url}/api/v1/session", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 401) and r.json()["detail"], r.text
    assert "set-cookie" not in r.headers


def test_session_store_expires_idle_and_old_sessions(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite", idle_s=600, max_s=3600)
    sid, s = store.create(username="u", role="admin", source="local", display_name="", address="a",
                          user_agent="t", now=1000.0)
    assert stat.S_IMODE(os.stat(tmp_path / "s.sqlite").st_mode) == 0o600
    assert store.get(sid, now=1500.0) is not None  # used within the idle window: touched
    assert store.get(sid, now=2050.0) is not None
    assert store.get(sid, now=2700.0) is None  # idle 650 s > 600 s: ended and deleted
    assert store.get(sid, now=2000.0) is None

    sid, _ = store.create(username="u", role="admin", source="local", display_name="", address="a",
                          user_agent="t", now=10_000.0)
    for t in range(10_500, 13_600, 500):  # used every 500 s, never idle...
        assert store.get(sid, now=float(t)) is not None
    assert store.get(sid, now=13_600.0) is None  # ...but max_s after sign-in it ends anyway
    assert store.get("", now=0) is None and store.get("x" * 1000, now=0) is None


def test_session_ids_are_stored_only_as_digests(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite", idle_s=600, max_s=3600)
    sid, _ = store.create(username="u", role="admin", source="local", display_name="", address="a",
                          user_agent="t")
    store.conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = (tmp_path / "s.sqlite").read_bytes()
    assert sid.encode() not in raw


def test_failure_window_slides_and_counts_per_name_address_and_name(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite", idle_s=600, max_s=3600)
    limits = dict(max_failures=3, max_address=100, window_s=900)
    for t in (0.0, 100.0, 200.0):
        wait, reserved = store.attempt("bob", "1.2.3.4", now=t, **limits)
        assert wait == 0 and reserved  # counted before the password is checked
    # the same name from the same address: locked until the first failure leaves the window
    assert store.attempt("BOB", "1.2.3.4", now=300.0, **limits) == (601, [])
    assert store.attempt("\uff42ob ", "1.2.3.4", now=300.0, **limits)[0] == 601  # full-width, padded
    # from elsewhere the name is still usable: one address cannot lock a user out for everyone
    assert store.attempt("bob", "5.6.7.8", now=300.0, **limits)[0] == 0
    assert store.attempt("bob", "1.2.3.4", now=901.0, **limits)[0] == 0
    # a right password hands its own reservation back and forgets this address's misses
    wait, reserved = store.attempt("carol", "1.2.3.4", now=1000.0, **limits)
    store.succeeded("carol", "1.2.3.4", reserved)
    assert store.conn.execute("SELECT count(*) FROM signin_failures WHERE key LIKE 'carol%'").fetchone()[0] == 0


def test_ipv6_clients_count_per_64_and_a_name_has_a_wide_limit(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite", idle_s=600, max_s=3600)
    limits = dict(max_failures=2, max_address=3, window_s=900)
    for i in range(3):
        assert store.attempt(f"u{i}", f"2001:db8::{i + 1}", now=1.0, **limits)[0] == 0
    assert store.attempt("u9", "2001:db8::ffff", now=2.0, **limits)[0] > 0  # same /64
    assert store.attempt("u9", "2001:db8:0:1::1", now=2.0, **limits)[0] == 0  # next /64
    # the name-wide limit (10 x max_failures) stops a guesser that rotates addresses
    for i in range(20):
        assert store.attempt("target", f"10.0.{i}.1", now=3.0, **limits)[0] == 0
    assert store.attempt("target", "10.1.0.1", now=3.0, **limits)[0] > 0


def test_sealed_hashes_open_only_with_their_site_key(tmp_path):
    a = SiteKey.load_or_create(tmp_path / "a.key")
    b = SiteKey.load_or_create(tmp_path / "b.key")
    sealed = passwords.seal(a, PW)
    assert passwords.verify(a, sealed, PW)
    assert not passwords.verify(a, sealed, PW + "x")
    assert not passwords.verify(b, sealed, PW)  # a peer mirroring the log cannot even test a guess
    assert not passwords.verify(a, "not base64!", PW)
    assert not passwords.verify(a, sealed, "")


def test_cli_manages_users(site):
    env = {"ODST_TOKEN": site.token, "ODST_SERVER": site.url, "ODST_NEW_PASSWORD": PW}
    r = run_odst("user", "add", "cli-user", "--role", "auditor", "--display-name", "From CLI", env=env)
    assert r.returncode == 0 and "created" in r.stdout, r.stderr
    assert sign_in(site, "cli-user", PW).json()["role"] == "auditor"
    r = run_odst("user", "role", "cli-user", "operator", env=env)
    assert r.returncode == 0, r.stderr
    r = run_odst("user", "list", env=env)
    assert "cli-user\toperator\tFrom CLI" in r.stdout
    r = run_odst("user", "passwd", "cli-user", env={**env, "ODST_NEW_PASSWORD": "short"})
    assert r.returncode != 0 and "at least 10 characters" in r.stderr
    r = run_odst("user", "remove", "cli-user", env=env)
    assert r.returncode == 0 and sign_in(site, "cli-user", PW).status_code == 401


def _parallel(n: int, fn) -> list:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def test_parallel_guesses_cannot_slip_under_the_limit(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW, "ODST_SIGNIN_MAX_FAILURES": "3"}).start()
    codes = _parallel(24, lambda i: sign_in(site, "admin", f"guess {i}").status_code)
    assert codes.count(401) <= 3 and set(codes) <= {401, 429, 503}, codes


def _admin_hash(site) -> str:
    """The argon2 hash of the bootstrap admin's password, unsealed with the site's own key."""
    import base64
    from odst.accounts.passwords import _box
    from odst.datadir import key_path
    from odst.events.signing import SiteKey
    with site.client() as admin:
        sealed = user_events(admin)[0]["envelope"]["event"]["password_sealed"]
    return _box(SiteKey.load_or_create(key_path(site.data))).decrypt(base64.b64decode(sealed)).decode()


def test_a_sign_in_flood_does_not_stall_the_api(make_site):
    """Password hashing has a pool of its own: while dozens of sign-ins wait for it, a
    bearer-token request is answered first (an order, not a time bound)."""
    from concurrent.futures import ThreadPoolExecutor
    # the real argon2 parameters (the suite's cheap ones, the knob, are off): a hash costs what
    # it does in production, so the flood fills the hashing pool
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW, "ODST_SIGNIN_MAX_FAILURES": "1000",
                          "ODST_SIGNIN_MAX_FAILURES_ADDRESS": "1000", "ODST_TEST_ARGON2": ""}).start()
    assert _admin_hash(site).startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    with ThreadPoolExecutor(48) as pool:
        flood = [pool.submit(sign_in, site, f"user{i}", "wrong password") for i in range(48)]
        # sent: waiting for an answer, or answered (beyond the hashing queue a sign-in is refused
        # with 503 at once, so "running" alone may never reach 40 on a busy machine)
        wait_until(lambda: sum(f.running() or f.done() for f in flood) >= 40, 10, what="the flood to be sent")
        with site.client() as c:
            r = c.get("/api/v1/packages")
        pending = sum(not f.done() for f in flood)
        codes = [f.result().status_code for f in flood]
    assert r.status_code == 200
    assert pending > 0, "the API answered only after every sign-in was judged"
    assert set(codes) <= {401, 503} and 401 in codes, codes
    assert all(f.result().json()["detail"] for f in flood)


def test_sign_in_takes_only_json_from_this_origin(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW}).start()
    body = json.dumps({"username": "admin", "password": PW})
    r = httpx.post(f"{site.url}/api/v1/session", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "set-cookie" not in r.headers  # what a cross-site form can send
    r = httpx.post(f"{site.url}/api/v1/session", content=body,
                   headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = httpx.post(f"{site.url}/api/v1/session", content=body,
                   headers={"Content-Type": "application/json; charset=utf-8", "Origin": site.url})
    assert r.status_code == 200


def test_concurrent_user_changes_keep_an_admin_and_one_owner_per_name(site):
    admin = site.client()
    assert admin.post("/api/v1/users", json={"username": "admin2", "password": PW, "role": "admin"}).status_code == 201
    demote = [("admin", "operator"), ("admin2", "auditor")]
    codes = _parallel(2, lambda i: admin.patch(f"/api/v1/users/{demote[i][0]}", json={"role": demote[i][1]}).status_code)
    assert sorted(codes) == [200, 400], codes
    assert [u["role"] for u in admin.get("/api/v1/users").json()["users"]].count("admin") == 1

    names = ["dup", "DUP"]
    codes = _parallel(2, lambda i: admin.post("/api/v1/users", json={
        "username": names[i], "password": PW + str(i), "role": "auditor"}).status_code)
    assert sorted(codes) == [201, 409], codes
    assert len([e for e in user_events(admin) if e["type"] == "UserCreated" and e["envelope"]["event"]["username"].lower() == "dup"]) == 1


def _stream_lines(client: httpx.Client, out: list, done: threading.Event):
    try:
        with client.stream("GET", "/api/v1/events/stream", timeout=httpx.Timeout(60, read=60)) as r:
            out.append(("status", r.status_code))
            for line in r.iter_lines():
                out.append(("line", line))
    except httpx.HTTPError as exc:
        out.append(("error", repr(exc)))
    finally:
        done.set()


def test_an_event_stream_ends_with_its_session(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW}).start()
    c, csrf = browser(site, "admin", PW)
    got, done = [], threading.Event()
    threading.Thread(target=_stream_lines, args=(c, got, done), daemon=True).start()
    wait_until(lambda: ("line", ": odst event stream") in got, 20, what="the stream to open")
    with site.client() as admin:
        assert admin.put("/api/v1/packages/before.pkg", content=b"1").status_code == 201
        wait_until(lambda: any("before.pkg" in x[1] for x in got if x[0] == "line"), 20, what="a live event")
        other = httpx.Client(base_url=site.url, cookies={"odst_session": c.cookies.get("odst_session")})
        assert other.delete("/api/v1/session", headers={"X-CSRF-Token": csrf}).status_code == 200
        assert admin.put("/api/v1/packages/after.pkg", content=b"2").status_code == 201
    assert done.wait(30), "the stream went on after sign-out"
    assert not any("after.pkg" in x[1] for x in got if x[0] == "line")


def test_an_open_event_stream_does_not_hold_up_shutdown(make_site):
    site = make_site(env={"ODST_ADMIN_PASSWORD": PW}).start()
    got, done = [], threading.Event()
    threading.Thread(target=_stream_lines, args=(site.client(), got, done), daemon=True).start()
    wait_until(lambda: ("line", ": odst event stream") in got, 20, what="the stream to open")
    assert site.stop() == 0
    assert done.wait(30)
    assert "graceful shutdown exceeded" not in site.log()
