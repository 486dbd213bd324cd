"""A real OpenLDAP (slapd) on 127.0.0.1 for the LDAP sign-in tests (fixture: ``slapd``).

One slapd per test session, with its own slapd.conf, database and certificates
in a temporary directory: the system slapd service and /etc/ldap/slapd.d are
never used. It listens on ldap:// (StartTLS offered) and ldaps://, both on
127.0.0.1 only, with a self-signed CA whose PEM is ``slapd.ca_file``.

Directory (base dc=odst,dc=test):

* cn=admin,dc=odst,dc=test — rootdn (password ``admin-secret``)
* cn=odst-svc,ou=services,dc=odst,dc=test — service account (``svc-secret``)
* ou=people: alice (alice-pw, "Alice Admin"), bob (bob-pw), carol (carol-pw),
  mallory (mallory-pw) — inetOrgPerson with uid, {SSHA} passwords
* ou=groups (groupOfNames): odst-admins {alice}, odst-operators {bob},
  odst-auditors {carol}, other {mallory}

The memberof overlay is on, so users also carry memberOf. Anyone may read the
directory except userPassword, which is only usable to bind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import ldap3
import pytest
from ldap3.core.exceptions import LDAPException

from odst.config import Settings

SLAPD = "/usr/sbin/slapd"
BASE = "dc=odst,dc=test"
ADMIN_DN, ADMIN_PASSWORD = f"cn=admin,{BASE}", "admin-secret"
SVC_DN, SVC_PASSWORD = f"cn=odst-svc,ou=services,{BASE}", "svc-secret"
PEOPLE, GROUPS = f"ou=people,{BASE}", f"ou=groups,{BASE}"
USERS = {  # uid: (password, cn, displayName)
    "alice": ("alice-pw", "Alice Adams", "Alice Admin"),
    "bob": ("bob-pw", "Bob Brown", "Bob Operator"),
    "carol": ("carol-pw", "Carol Clark", "Carol Auditor"),
    "mallory": ("mallory-pw", "Mallory Moe", "Mallory"),
}
GROUP_MEMBERS = {"odst-admins": ["alice"], "odst-operators": ["bob"],
                 "odst-auditors": ["carol"], "other": ["mallory"]}
ROLE_MAP = ["odst-admins=admin", "odst-operators=operator", "odst-auditors=auditor"]


@dataclass
class Slapd:
    url: str            # ldap://127.0.0.1:P1 (StartTLS available)
    ldaps_url: str      # ldaps://127.0.0.1:P2
    ca_file: str        # PEM of the CA that signed the server certificate
    base: str
    bind_dn: str        # the service account
    bind_password: str
    admin_dn: str       # rootdn, for tests that change the directory
    admin_password: str
    log_file: Path

    def settings_values(self) -> dict:
        """ODST settings (field name: value) for sign-in against this directory over StartTLS."""
        return {
            "ldap_url": self.url, "ldap_starttls": True, "ldap_ca_file": self.ca_file,
            "ldap_tls_verify": True, "ldap_bind_dn": self.bind_dn,
            "ldap_bind_password": self.bind_password, "ldap_user_base": PEOPLE,
            "ldap_user_filter": "(uid={username})", "ldap_group_base": GROUPS,
            "ldap_group_filter": "(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
            "ldap_role_map": list(ROLE_MAP), "ldap_timeout_s": 5.0,
        }

    def settings_env(self) -> dict[str, str]:
        """The same settings as ODST_LDAP_* environment variables (for ``odst serve``)."""
        def text(v) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list):
                return ",".join(v)
            return str(v)
        return {f"ODST_{k.upper()}": text(v) for k, v in self.settings_values().items()}

    def settings(self, **overrides) -> Settings:
        """A validated Settings for this directory; keyword arguments replace fields."""
        return Settings(**{**self.settings_values(), **overrides}).validate()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-5000:] if self.log_file.exists() else ""


from harness.ports import free_port as _free_port  # noqa: E402  (safe under pytest-xdist)


def _run(*cmd: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def _ensure_slapd() -> None:
    """apt-get install slapd ldap-utils, only when slapd is missing."""
    if Path(SLAPD).exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slapd", "ldap-utils"]
    if subprocess.run(install, check=False, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def _certificates(d: Path) -> None:
    """ca.pem/ca.key (self-signed CA) and server.pem/server.key for 127.0.0.1 and localhost."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
         "-subj", "/CN=ODST test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _run("openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "30", "-extfile", "server.ext", cwd=d)


def _slapd_conf(d: Path) -> Path:
    conf = d / "slapd.conf"
    conf.write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
# Debian builds backends and overlays as modules
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
TLSCACertificateFile {d}/ca.pem
TLSCertificateFile {d}/server.pem
TLSCertificateKeyFile {d}/server.key
# TLS 1.2 or later
TLSProtocolMin 3.3

database mdb
maxsize 67108864
suffix "{BASE}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {d}/db
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE

access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{SVC_DN}" read
    by users read
    by anonymous read
""")
    (d / "db").mkdir()
    return conf


def _ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def _populate(url: str) -> None:
    """Add the test entries online (not slapadd), so the memberof overlay fills in memberOf."""
    conn = ldap3.Connection(ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=5),
                            ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, receive_timeout=10)
    entries = [
        (BASE, ["dcObject", "organization"], {"dc": "odst", "o": "ODST test"}),
        (f"ou=services,{BASE}", ["organizationalUnit"], {"ou": "services"}),
        (PEOPLE, ["organizationalUnit"], {"ou": "people"}),
        (GROUPS, ["organizationalUnit"], {"ou": "groups"}),
        (SVC_DN, ["organizationalRole", "simpleSecurityObject"],
         {"cn": "odst-svc", "userPassword": _ssha(SVC_PASSWORD)}),
    ]
    for uid, (password, cn, display) in USERS.items():
        entries.append((f"uid={uid},{PEOPLE}", ["inetOrgPerson"], {
            "uid": uid, "cn": cn, "sn": cn.split()[-1], "displayName": display,
            "mail": f"{uid}@odst.test", "userPassword": _ssha(password)}))
    for cn, members in GROUP_MEMBERS.items():
        entries.append((f"cn={cn},{GROUPS}", ["groupOfNames"],
                        {"cn": cn, "member": [f"uid={m},{PEOPLE}" for m in members]}))
    try:
        for dn, classes, attrs in entries:
            if not conn.add(dn, classes, attrs):
                raise RuntimeError(f"adding {dn}: {conn.result}")
    finally:
        conn.unbind()


def _bind_works(url: str) -> bool:
    try:
        conn = ldap3.Connection(ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=1),
                                ADMIN_DN, ADMIN_PASSWORD, receive_timeout=2)
        ok = conn.bind()
        conn.unbind()
        return ok
    except LDAPException:
        return False


@pytest.fixture(scope="session")
def slapd(tmp_path_factory):
    _ensure_slapd()
    d = tmp_path_factory.mktemp("slapd")
    _certificates(d)
    conf = _slapd_conf(d)
    port, tls_port = _free_port(), _free_port()
    url, ldaps_url = f"ldap://127.0.0.1:{port}", f"ldaps://127.0.0.1:{tls_port}"
    log_file = d / "slapd.log"
    with open(log_file, "wb") as log:
        # -d keeps slapd in the foreground (so we own the process); 256 = stats: one line per operation
        proc = subprocess.Popen([SLAPD, "-d", "256", "-h", f"{url}/ {ldaps_url}/", "-f", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Slapd(url=url, ldaps_url=ldaps_url, ca_file=str(d / "ca.pem"), base=BASE,
                   bind_dn=SVC_DN, bind_password=SVC_PASSWORD, admin_dn=ADMIN_DN,
                   admin_password=ADMIN_PASSWORD, log_file=log_file)
    try:
        deadline = time.monotonic() + 30
        while not _bind_works(url):
            if proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not accept a bind within 30 s:\n{server.log()}")
            time.sleep(0.05)
        _populate(url)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
