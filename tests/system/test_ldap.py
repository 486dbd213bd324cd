"""LDAP sign-in against a real slapd (tests/ldap_server.py): roles, refusals, TLS, timeouts."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from odst.accounts import ldap
from odst.accounts.ldap import DirectoryRefused, DirectoryUnavailable
from odst.config import load

GROUPS = "ou=groups,dc=odst,dc=test"


@pytest.fixture
def silent_server():
    """A TCP listener that accepts connections and never says a word: ldap://127.0.0.1:PORT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for s in held:
        s.close()
    listener.close()


def unreachable_url() -> str:
    from harness.ports import free_port
    return f"ldap://127.0.0.1:{free_port()}"  # a port nobody listens on


@pytest.mark.parametrize("username,role,display", [
    ("alice", "admin", "Alice Admin"),
    ("bob", "operator", "Bob Operator"),
    ("carol", "auditor", "Carol Auditor"),
])
def test_mapped_groups_give_roles(slapd, username, role, display):
    user = ldap.authenticate(slapd.settings(), username, f"{username}-pw")
    assert user.role == role
    assert user.username == username
    assert user.dn == f"uid={username},ou=people,dc=odst,dc=test"
    assert user.display_name == display
    assert user.email == f"{username}@odst.test"
    assert [g.lower().endswith("," + GROUPS) for g in user.groups] == [True]


def test_username_is_returned_as_the_directory_spells_it(slapd):
    assert ldap.authenticate(slapd.settings(), "ALICE", "alice-pw").username == "alice"


def test_user_in_no_mapped_group_is_refused(slapd):
    with pytest.raises(DirectoryRefused, match="not in any group mapped to an ODST role"):
        ldap.authenticate(slapd.settings(), "mallory", "mallory-pw")


def test_wrong_password_and_unknown_user_are_refused(slapd):
    with pytest.raises(DirectoryRefused, match="refused the password"):
        ldap.authenticate(slapd.settings(), "alice", "bob-pw")
    with pytest.raises(DirectoryRefused, match="no directory user"):
        ldap.authenticate(slapd.settings(), "nobody", "nobody-pw")


@pytest.mark.parametrize("username,password", [
    ("alice", ""),                   # an unauthenticated bind would "succeed"
    ("", "x"),
    ("a" * 257, "x"),
    ("alice\x00", "alice-pw"),
    ("alice\n", "alice-pw"),
])
def test_unusable_credentials_are_refused_before_the_network(slapd, username, password):
    unreachable = slapd.settings(ldap_url=unreachable_url())
    with pytest.raises(DirectoryRefused):
        ldap.authenticate(unreachable, username, password)


@given(st.text(max_size=40))
def test_a_filled_in_user_name_is_one_literal_value(name):
    value = ldap.fill_filter("(uid={username})", username=name)[len("(uid="):-1]
    assert not set("()*") & set(value)
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", value, re.DOTALL)  # every backslash starts an escape


def test_values_are_filled_in_once():
    template = "(|(member={dn})(memberUid={username}))"
    assert ldap.fill_filter(template, dn="cn=x", username="{dn}") == "(|(member=cn=x)(memberUid={dn}))"


@pytest.mark.parametrize("username", ["*", "alice)(uid=*", "*)(|(uid=*", "al*", "alice)(|(objectClass=*)"])
def test_filter_injection_matches_nobody(slapd, username):
    with pytest.raises(DirectoryRefused, match="no directory user"):
        ldap.authenticate(slapd.settings(), username, "alice-pw")


def test_a_filter_matching_several_entries_is_refused(slapd):
    loose = slapd.settings(ldap_user_filter="(|(uid={username})(objectClass=inetOrgPerson))")
    with pytest.raises(DirectoryRefused, match="more than one"):
        ldap.authenticate(loose, "alice", "alice-pw")


def test_role_map_takes_full_dns_any_case_and_the_highest_role_wins(slapd):
    settings = slapd.settings(ldap_role_map=["ODST-Admins=auditor",
                                             "CN=odst-admins, OU=Groups,DC=odst,DC=TEST=operator"])
    assert ldap.authenticate(settings, "alice", "alice-pw").role == "operator"


def test_memberof_is_read_when_there_is_no_group_base(slapd):
    user = ldap.authenticate(slapd.settings(ldap_group_base=""), "bob", "bob-pw")
    assert user.role == "operator"
    assert [g.lower() for g in user.groups] == [f"cn=odst-operators,{GROUPS}"]


def test_anonymous_search_when_no_service_account(slapd):
    settings = slapd.settings(ldap_bind_dn="", ldap_bind_password="")
    assert ldap.authenticate(settings, "carol", "carol-pw").role == "auditor"


def test_ldaps_works(slapd):
    settings = slapd.settings(ldap_url=slapd.ldaps_url, ldap_starttls=False)
    assert ldap.authenticate(settings, "alice", "alice-pw").role == "admin"


@pytest.mark.parametrize("url_attr,starttls", [("url", True), ("ldaps_url", False)])
def test_untrusted_certificate_fails_closed(slapd, url_attr, starttls):
    settings = slapd.settings(ldap_url=getattr(slapd, url_attr), ldap_starttls=starttls,
                              ldap_ca_file="", ldap_tls_verify=True)
    with pytest.raises(DirectoryUnavailable, match="certificate|CERTIFICATE"):
        ldap.authenticate(settings, "alice", "alice-pw")


def test_tls_verify_off_accepts_the_certificate(slapd):
    settings = slapd.settings(ldap_ca_file="", ldap_tls_verify=False)
    assert ldap.authenticate(settings, "alice", "alice-pw").role == "admin"


def test_wrong_service_password_is_the_directory_being_unavailable(slapd):
    settings = slapd.settings(ldap_bind_password="not-the-secret")
    with pytest.raises(DirectoryUnavailable, match="service bind"):
        ldap.authenticate(settings, "alice", "alice-pw")
    with pytest.raises(DirectoryUnavailable, match="service bind"):
        ldap.check(settings)


def test_missing_user_base_is_unavailable(slapd):
    settings = slapd.settings(ldap_user_base="ou=nowhere,dc=odst,dc=test")
    with pytest.raises(DirectoryUnavailable, match="does not exist"):
        ldap.authenticate(settings, "alice", "alice-pw")


def test_unreachable_directory_is_unavailable(slapd):
    with pytest.raises(DirectoryUnavailable, match="connecting"):
        ldap.authenticate(slapd.settings(ldap_url=unreachable_url()), "alice", "alice-pw")


@pytest.mark.parametrize("scheme,starttls", [("ldap", True), ("ldap", False), ("ldaps", False)])
def test_a_server_that_never_answers_times_out(slapd, silent_server, scheme, starttls):
    settings = slapd.settings(ldap_url=f"{scheme}://{silent_server}", ldap_starttls=starttls,
                              ldap_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        ldap.authenticate(settings, "alice", "alice-pw")
    assert time.monotonic() - started < 10 * settings.ldap_timeout_s


def test_check_says_ok(slapd):
    result = ldap.check(slapd.settings())
    assert result.startswith("ok: ") and "StartTLS" in result and slapd.bind_dn in result


def test_fixture_env_configures_the_same_settings(slapd):
    from_env = load(env={"ODST_DATA": "/nonexistent-odst-data", **slapd.settings_env()})
    direct = slapd.settings()
    for name in slapd.settings_values():
        assert getattr(from_env, name) == getattr(direct, name), name
    assert ldap.enabled(from_env) and not ldap.enabled(load(env={"ODST_DATA": "/nonexistent-odst-data"}))
