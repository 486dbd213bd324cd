"""Sign-in against an LDAP directory or Active Directory: find the user, verify the password, map groups to a role.

Synchronous (ldap3); the gateway calls it from a worker thread. The pipeline:

1. refuse an unusable user name or an empty password before touching the
   network (an empty password is an *unauthenticated bind*, which many
   servers accept as success);
2. connect (ldaps://, or ldap:// upgraded with StartTLS when configured —
   a failed StartTLS ends the attempt, it never continues in clear text),
   bind as the service account (or anonymously) and search ``ldap_user_base``
   with ``ldap_user_filter``; exactly one entry must match;
3. bind as that entry's DN with the password, on a fresh connection;
4. collect the user's groups (search ``ldap_group_base``, or read memberOf);
5. map them through ``ldap_role_map``; the highest mapped role wins.

A refusal (the user cannot sign in) is :class:`DirectoryRefused`; a directory
ODST cannot use (unreachable, slow, TLS failure, service bind refused) is
:class:`DirectoryUnavailable`.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ldap3
import structlog
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from odst.accounts.pool import BoundedPool
from odst.config import Settings
from odst.errors import OdstError

log = structlog.get_logger("odst.ldap")

ROLE_RANK = {"auditor": 1, "operator": 2, "admin": 3}
MAX_USERNAME = 256
# Directory requests wait up to ldap_timeout_s on the network: a bounded pool of their own,
# never the event loop's default executor (see odst.accounts.pool).
POOL = BoundedPool("ldap", workers=4, max_waiting=32)
# Bind results that mean "this user may not sign in"; any other failure is the directory's.
_REFUSING_BIND_RESULTS = {48, 49, 50, 53}  # inappropriateAuthentication, invalidCredentials,
#                                            insufficientAccessRights, unwillingToPerform
_SIZE_LIMIT_EXCEEDED, _NO_SUCH_OBJECT = 4, 32


class DirectoryRefused(OdstError):
    """The directory does not let this user sign in (wrong password, unknown, no mapped group)."""
    status, code = 401, "signin_failed"


class DirectoryUnavailable(OdstError):
    """ODST cannot use the directory: unreachable, timed out, TLS failure or refused service bind."""
    status, code = 503, "directory_unavailable"


@dataclass(frozen=True)
class DirectoryUser:
    username: str             # as the directory spells it (e.g. the uid value)
    dn: str
    display_name: str         # displayName, else cn, else username
    email: str                # mail, or ""
    groups: tuple[str, ...]   # DNs of the user's groups
    role: str                 # admin | operator | auditor


def enabled(settings: Settings) -> bool:
    return bool(settings.ldap_url)


# --- pure parts -----------------------------------------------------------------------

def username_problem(username: str) -> str | None:
    """Why this user name is never sent to the directory, or None."""
    if not username:
        return "user name is empty"
    if len(username) > MAX_USERNAME:
        return f"user name is longer than {MAX_USERNAME} characters"
    if any(unicodedata.category(c) == "Cc" for c in username):
        return "user name contains control characters"
    return None


def fill_filter(template: str, **values: str) -> str:
    """Put filter-escaped values in for {username} and {dn}, in one pass (a value is never re-expanded)."""
    return re.sub(r"\{(username|dn)\}", lambda m: escape_filter_chars(values[m.group(1)]), template)


def normal_dn(dn: str) -> str:
    """A DN in a form to compare: attribute names and values lower case, no padding."""
    try:
        return "".join(f"{a.strip().lower()}={v.strip().lower()}{sep}" for a, v, sep in parse_dn(dn, strip=True))
    except LDAPException:
        return dn.strip().lower()


def group_names(dn: str, cns: tuple[str, ...] = ()) -> set[str]:
    """The keys a role map entry may use for a group: its DN and its cn values (lower case)."""
    names = {normal_dn(dn)} | {cn.lower() for cn in cns}
    try:
        attr, value, _ = parse_dn(dn, strip=True)[0]
        if attr.strip().lower() == "cn":
            names.add(value.strip().lower())
    except (LDAPException, IndexError):
        pass
    return names


def role_for(groups: dict[str, tuple[str, ...]], role_map: list[str]) -> str | None:
    """The highest role ``role_map`` (GROUP=role) gives any of ``groups`` (DN: cn values), or None."""
    names: set[str] = set()
    for dn, cns in groups.items():
        names |= group_names(dn, cns)
    best = None
    for entry in role_map:
        group, _, role = entry.rpartition("=")
        key = normal_dn(group) if "=" in group else group.strip().lower()
        if key in names and role in ROLE_RANK and (best is None or ROLE_RANK[role] > ROLE_RANK[best]):
            best = role
    return best


def filter_attributes(user_filter: str) -> list[str]:
    """Attributes the filter compares with {username}, e.g. uid or sAMAccountName."""
    return re.findall(r"\(([A-Za-z][\w;-]*)=\{username\}\)", user_filter)


def directory_spelling(attrs: dict, name_attrs: list[str], typed: str) -> str:
    """The user name as the entry spells it: the name attribute value equal to what was typed
    (ignoring case), else the first name attribute value, else what was typed."""
    values = [v for a in name_attrs for v in _values(attrs, a)]
    return next((v for v in values if v.lower() == typed.lower()), values[0] if values else typed)


def _values(attrs: dict, name: str) -> list[str]:
    for key, value in attrs.items():
        if key.lower() == name.lower():
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            return [str(value)] if value not in (None, "") else []
    return []


def _first(attrs: dict, *names: str) -> str:
    for name in names:
        if values := _values(attrs, name):
            return values[0]
    return ""


# --- I/O shell ------------------------------------------------------------------------

def _transport(settings: Settings) -> str:
    if settings.ldap_url.startswith("ldaps://"):
        return "ldaps"
    return "StartTLS" if settings.ldap_starttls else "plain text, no TLS"


def _unavailable(settings: Settings, detail: str, **fields) -> DirectoryUnavailable:
    log.error("ldap directory unavailable", url=settings.ldap_url, detail=detail, **fields)
    return DirectoryUnavailable(detail)


def _result_text(conn: ldap3.Connection) -> str:
    """The last operation's result, e.g. "invalidCredentials" or "noSuchObject: <server message>"."""
    result = conn.result or {}
    return ": ".join(p for p in (str(result.get("description") or ""), result.get("message") or "") if p)


def _tls(settings: Settings) -> ldap3.Tls:
    if settings.ldap_ca_file and not os.path.isfile(settings.ldap_ca_file):
        raise _unavailable(settings, f"ldap_ca_file {settings.ldap_ca_file} does not exist")
    # PROTOCOL_TLS_CLIENT: Python >= 3.10 sets TLS 1.2 as the minimum on such a context.
    return ldap3.Tls(validate=ssl.CERT_REQUIRED if settings.ldap_tls_verify else ssl.CERT_NONE,
                     ca_certs_file=settings.ldap_ca_file or None, version=ssl.PROTOCOL_TLS_CLIENT)


@contextmanager
def _directory_errors(settings: Settings, doing: str) -> Iterator[None]:
    """Socket, timeout and TLS failures become DirectoryUnavailable saying what was being done."""
    try:
        yield
    except (LDAPException, OSError) as exc:
        message = "; ".join(str(a) for a in exc.args) or type(exc).__name__
        raise _unavailable(settings, f"{doing} at {settings.ldap_url} ({_transport(settings)}): {message}",
                           error_type=type(exc).__name__) from exc


def _receive_timeout(settings: Settings) -> int:
    # ldap3 sets SO_RCVTIMEO with struct.pack("LL", timeout, 0): whole seconds only
    return max(1, math.ceil(settings.ldap_timeout_s))


@contextmanager
def _connection(settings: Settings, user: str | None = None,
                password: str | None = None) -> Iterator[ldap3.Connection]:
    """An open connection (TLS set up as configured), not yet bound; unbound on exit."""
    tls = _tls(settings)
    with _directory_errors(settings, "connecting"):
        server = ldap3.Server(settings.ldap_url, use_ssl=settings.ldap_url.startswith("ldaps://"),
                              tls=tls, get_info=ldap3.NONE, connect_timeout=settings.ldap_timeout_s)
        conn = ldap3.Connection(
            server, user=user, password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE, raise_exceptions=False,
            read_only=True, auto_referrals=False, receive_timeout=_receive_timeout(settings))
        conn.open(read_server_info=False)
    try:
        if settings.ldap_starttls:
            with _directory_errors(settings, "starting TLS"):
                started = conn.start_tls(read_server_info=False)
            if not started or not conn.tls_started:  # fail closed: never go on in clear text
                raise _unavailable(settings, f"StartTLS at {settings.ldap_url} did not start: {conn.last_error}")
        yield conn
    finally:
        try:
            conn.unbind()
        except (LDAPException, OSError):
            pass


def _service_bind(settings: Settings, conn: ldap3.Connection) -> None:
    with _directory_errors(settings, "binding as the service account"):
        ok = conn.bind(read_server_info=False)
    if not ok:
        who = settings.ldap_bind_dn or "anonymous"
        raise _unavailable(settings, f"the directory refused the service bind as {who} ({_result_text(conn)}); "
                                     "check ldap_bind_dn and ldap_bind_password")


def _service_connection(settings: Settings):
    if settings.ldap_bind_dn and not settings.ldap_bind_password:
        # an empty password would be an unauthenticated bind: "success", as nobody
        raise _unavailable(settings, "ldap_bind_dn is set but ldap_bind_password is empty")
    return _connection(settings, settings.ldap_bind_dn or None, settings.ldap_bind_password or None)


def _search(settings: Settings, conn: ldap3.Connection, base: str, search_filter: str,
            attributes: list[str], size_limit: int = 0) -> tuple[list[dict], int]:
    """Entries (dn, attributes) and the result code; searchResRef references are skipped."""
    with _directory_errors(settings, f"searching {base}"):
        conn.search(base, search_filter, search_scope=ldap3.SUBTREE, attributes=attributes,
                    size_limit=size_limit)
    code = conn.result.get("result", 0)
    entries = [e for e in (conn.response or []) if e.get("type") == "searchResEntry"]
    if code not in (0, _SIZE_LIMIT_EXCEEDED):
        what = "does not exist" if code == _NO_SUCH_OBJECT else "cannot be searched"
        raise _unavailable(settings, f"{base} {what} ({_result_text(conn)})")
    return entries, code


def _refuse(username: str, reason: str, **fields) -> DirectoryRefused:
    log.warning("ldap sign-in refused", user=username, reason=reason, **fields)
    return DirectoryRefused(reason)


def _find_user(settings: Settings, service: ldap3.Connection, username: str) -> tuple[str, dict, list[str]]:
    """(dn, attributes, name attributes) of the one directory entry this name matches."""
    name_attrs = filter_attributes(settings.ldap_user_filter)
    user_filter = fill_filter(settings.ldap_user_filter, username=username)
    entries, code = _search(settings, service, settings.ldap_user_base, user_filter,
                            [*name_attrs, "displayName", "cn", "mail", "memberOf"], size_limit=2)
    if code == _SIZE_LIMIT_EXCEEDED or len(entries) > 1:
        raise _refuse(username, f"user name {username!r} matches more than one directory entry",
                      filter=user_filter)
    if not entries:
        raise _refuse(username, f"no directory user matches {username!r}")
    return entries[0]["dn"], entries[0].get("attributes", {}), name_attrs


def _directory_user(settings: Settings, service: ldap3.Connection, username: str, dn: str, attrs: dict,
                    name_attrs: list[str]) -> DirectoryUser:
    """The user's groups and the role they map to; refused when no group maps to a role."""
    if settings.ldap_group_base:
        group_filter = fill_filter(settings.ldap_group_filter, dn=dn, username=username)
        found, _ = _search(settings, service, settings.ldap_group_base, group_filter, ["cn"])
        groups = {g["dn"]: tuple(_values(g.get("attributes", {}), "cn")) for g in found}
    else:
        groups = {g: () for g in _values(attrs, "memberOf")}
    spelled = directory_spelling(attrs, name_attrs, username)
    role = role_for(groups, settings.ldap_role_map)
    if role is None:
        raise _refuse(username, f"{dn} is not in any group mapped to an ODST role",
                      groups=sorted(groups))
    return DirectoryUser(username=spelled, dn=dn,
                         display_name=_first(attrs, "displayName", "cn") or spelled,
                         email=_first(attrs, "mail"), groups=tuple(groups), role=role)


def authenticate(settings: Settings, username: str, password: str) -> DirectoryUser:
    """The directory user with this name and password, and the ODST role their groups give."""
    if problem := username_problem(username):
        raise _refuse(username[:MAX_USERNAME], problem)
    if not password:
        raise _refuse(username, "password is empty")
    if not enabled(settings):
        raise DirectoryUnavailable("LDAP sign-in is not configured (ldap_url is empty)")

    with _service_connection(settings) as service:
        _service_bind(settings, service)
        dn, attrs, name_attrs = _find_user(settings, service, username)
        with _connection(settings, dn, password) as as_user:
            with _directory_errors(settings, "binding as the user"):
                ok = as_user.bind(read_server_info=False)
            if not ok:
                code = as_user.result.get("result")
                if code in _REFUSING_BIND_RESULTS:
                    raise _refuse(username, f"the directory refused the password for {dn}",
                                  result=_result_text(as_user))
                raise _unavailable(settings, f"binding as {dn}: {_result_text(as_user)}")
        user = _directory_user(settings, service, username, dn, attrs, name_attrs)
    log.info("ldap sign-in", user=user.username, dn=dn, role=user.role)
    return user


def lookup(settings: Settings, username: str) -> DirectoryUser:
    """The user as the directory has them now (no password): still there, and in which role.

    Sessions of directory users are re-checked with this, so removing someone from a
    mapped group (or from the directory) ends their access within minutes.
    """
    if problem := username_problem(username):
        raise _refuse(username[:MAX_USERNAME], problem)
    if not enabled(settings):
        raise DirectoryUnavailable("LDAP sign-in is not configured (ldap_url is empty)")
    with _service_connection(settings) as service:
        _service_bind(settings, service)
        dn, attrs, name_attrs = _find_user(settings, service, username)
        return _directory_user(settings, service, username, dn, attrs, name_attrs)


def check(settings: Settings) -> str:
    """Connect, bind as the service account and read ldap_user_base: the operator's "test LDAP settings"."""
    if not enabled(settings):
        raise DirectoryUnavailable("LDAP sign-in is not configured (ldap_url is empty)")
    with _service_connection(settings) as service:
        _service_bind(settings, service)
        with _directory_errors(settings, f"reading {settings.ldap_user_base}"):
            service.search(settings.ldap_user_base, "(objectClass=*)", search_scope=ldap3.BASE,
                           attributes=[])
        if service.result.get("result") != 0 or not service.response:
            raise _unavailable(settings, f"ldap_user_base {settings.ldap_user_base} cannot be read "
                                         f"({_result_text(service)})")
    who = settings.ldap_bind_dn or "anonymous"
    return f"ok: {settings.ldap_url} ({_transport(settings)}), bound as {who}, {settings.ldap_user_base} readable"
