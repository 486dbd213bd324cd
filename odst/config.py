"""Settings: flags, then ODST_* environment variables, then a TOML file, then defaults.

Every setting has one name; the environment variable is ODST_<NAME> in upper
case and the TOML key is <name> (top level) in ``--config FILE`` or
``<data>/odst.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(Exception):
    """A setting has a value ODST cannot use; the message says which and why."""


@dataclass
class Settings:
    data: Path = Path("./odst-data")
    http: str = "127.0.0.1:8080"
    http_workers: int = 1  # odst serve: gateway processes sharing the HTTP port (downloads use one core each)
    http_max_header_bytes: int = 64 * 1024  # a request head (request line + header fields) larger: 431
    http_header_timeout_s: float = 10.0  # a request head not complete this long after connecting: closed
    http_keepalive_s: int = 30  # an idle kept-alive connection is closed after this long
    send_timeout_s: float = 60.0  # a response the client takes no byte of for this long is dropped (nginx's send_timeout)
    body_timeout_s: float = 60.0  # a request body no byte of which comes for this long: closed (nginx's client_body_timeout)
    uploads_per_user: int = 16  # large uploads (over 256 KiB) one user or token may have in progress per gateway process; more: 429
    metrics_public: bool = False  # GET /metrics without credentials; false: an API token (any role) or a session
    nats: str = ""  # URL of an existing NATS server; empty: run the embedded one
    nats_credentials: str = ""  # with nats: a NATS user seed file (.nk or .creds); empty: <data>/nats-client.nk
    nats_auth_file: str = ""  # with nats: the auth.conf from `odst nats-config` the server includes; the projector keeps it current
    nats_listen: str = "127.0.0.1:-1"  # embedded broker's client address (-1: any free port)
    store: str = ""  # package store directory; empty: <data>/store
    site_name: str = ""
    public_url: str = ""  # how peers and Macs reach this gateway; empty: http://<http>
    leaf_listen: str = ""  # HOST:PORT: accept NATS leaf-node connections (a hub)
    leaf_remotes: list[str] = field(default_factory=list)  # nats-leaf://HOST:PORT to dial (a spoke)
    accept_stages: list[str] = field(default_factory=list)  # stages replicated here; empty: all
    replication_streams: int = 8  # requests in flight per package (a chunk, or a run of chunks)
    replication_packages: int = 2  # big packages (over 1 MiB) fetched at once; small ones go in batches beside them
    peer_run_chunks: int = 16  # chunks a peer may ask for in one HTTP request; 1: one per request (runs answered 404, as by older versions)
    replication_lease_s: int = 30  # a dead replicator's pull passes to another after this long
    apply_wait_s: float = 30.0  # how long an API write waits for this site's read model to apply its event; past it a 503 says the write stands and will appear
    withdraw_grace_s: int = 3600  # a held package whose stage this site no longer accepts is not served from then on; its file goes this long after (a demotion undone within it costs no re-pull)
    scrub_period_s: int = 7 * 86400  # the background scrub re-hashes the whole store once this often; 0: off
    scrub_min_rate: int = 4 << 20  # bytes/s the scrub reads at least (a small store is done quickly)
    scrub_max_rate: int = 64 << 20  # bytes/s it reads at most (also the pace of a re-check a peer's report asks for)
    context: str = "CasperShare"  # distribution point context: /<context>/Packages/<name>
    max_upload_bytes: int = 64 * (1 << 30)
    allowed_extensions: list[str] = field(default_factory=lambda: [".pkg", ".dmg", ".zip", ".mpkg"])
    default_stage: str = "prod"
    stages: list[str] = field(default_factory=lambda: ["dev", "test", "prod"])
    download_auth: str = "none"  # none | basic
    download_user: str = ""
    download_password: str = ""
    sync_interval: str = "always"  # JetStream fsync: always | e.g. 2m (NATS default)
    stream_replicas: int = 1  # 3 on a 3-node NATS cluster: the log survives losing a node
    smtp_host: str = ""  # SMTP server for notification mail; empty: no mail is sent
    smtp_port: int = 25
    smtp_starttls: bool = False  # upgrade the SMTP connection with STARTTLS before logging in
    smtp_ca_file: str = ""  # CA bundle to verify the SMTP server's certificate; empty: the system CAs
    smtp_user: str = ""  # SMTP login (with smtp_password); empty: no login
    smtp_password: str = ""
    smtp_from: str = "odst@localhost"
    notify_email_digest_s: int = 60  # events within this window go out as one mail per recipient
    webhook_max_attempts: int = 8  # a webhook delivery is given up after this many attempts
    webhook_backoff_s: float = 2.0  # first retry delay; doubles each attempt, at most 300 s
    session_idle_s: int = 3600  # a web UI session unused this long ends
    session_max_s: int = 12 * 3600  # a web UI session ends this long after sign-in, used or not
    cookie_secure: str = "auto"  # auto (Secure over https and on loopback) | always | never
    signin_max_failures: int = 5  # failed sign-ins per user name within signin_window_s before 429
    signin_max_failures_address: int = 20  # failed sign-ins per client address within the window
    signin_window_s: int = 900
    trusted_proxies: list[str] = field(default_factory=list)  # reverse proxies whose X-Forwarded-For/-Proto count
    ldap_url: str = ""  # ldap://host:389 or ldaps://host:636; empty: local users only
    ldap_starttls: bool = False  # upgrade ldap:// with StartTLS before binding
    ldap_ca_file: str = ""  # CA bundle to verify the LDAP server's certificate; empty: system CAs
    ldap_tls_verify: bool = True  # false only for testing: accept any certificate
    ldap_bind_dn: str = ""  # service account that searches for users; empty: anonymous search
    ldap_bind_password: str = ""
    ldap_user_base: str = ""  # e.g. ou=people,dc=example,dc=org
    ldap_user_filter: str = "(uid={username})"  # AD: (sAMAccountName={username})
    ldap_group_base: str = ""  # empty: read the user's memberOf attribute instead of searching
    ldap_group_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={username}))"
    ldap_role_map: list[str] = field(default_factory=list)  # GROUP=role; GROUP is a cn or a full DN
    ldap_timeout_s: float = 5.0
    ldap_recheck_s: int = 300  # a signed-in directory user's groups are looked up again this often
    # Jamf Pro (odst.jamf): set jamf_url at the one site that keeps Jamf Pro's records
    jamf_url: str = ""  # https://jamf.example.com[:8443]; empty: no Jamf Pro integration
    jamf_client_id: str = ""  # API client (OAuth client credentials); or jamf_user/jamf_password
    jamf_client_secret: str = ""  # better: ODST_JAMF_CLIENT_SECRET or jamf_client_secret_file
    jamf_client_secret_file: str = ""  # a file holding the secret, mode 0600
    jamf_user: str = ""  # a Jamf Pro account (Basic -> bearer token) instead of an API client
    jamf_password: str = ""
    jamf_password_file: str = ""  # a file holding the password, mode 0600
    jamf_ca_file: str = ""  # CA bundle for Jamf Pro's certificate; empty: the system CAs
    jamf_hash_type: str = "SHA_512"  # SHA_512 | SHA3_512 | MD5 (PreStage enrollment packages need MD5)
    jamf_stage: str = "prod"  # packages in this stage get a Jamf Pro package record
    jamf_quorum: int = 0  # sites that must serve a package before its record is written; 0: all that replicate the stage
    jamf_dry_run: bool = False  # log and record what would change in Jamf Pro, change nothing
    jamf_allow_deletes: bool = False  # delete a package's Jamf record when it is deleted here (only records ODST created)
    jamf_check_interval_s: int = 900  # drift check: compare Jamf Pro's records with ODST this often
    timezone: str = ""  # IANA zone (e.g. Europe/Berlin) of bandwidth timetables; empty: the system's
    log_format: str = "console"  # console | json
    log_level: str = "info"

    @property
    def store_dir(self) -> Path:
        return Path(self.store) if self.store else self.data / "store"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http}").rstrip("/")

    @property
    def default_replicated_stages(self) -> list[str]:
        return self.accept_stages or self.stages

    @property
    def http_host(self) -> str:
        return self.http.rsplit(":", 1)[0]

    @property
    def http_port(self) -> int:
        return int(self.http.rsplit(":", 1)[1])

    def validate(self) -> "Settings":
        for name in ("http", "nats_listen", "leaf_listen"):
            _check_address(name, getattr(self, name), any_port=name == "nats_listen")
        if self.download_auth not in ("none", "basic"):
            raise ConfigError("download_auth must be 'none' or 'basic'")
        if self.download_auth == "basic" and not (self.download_user and self.download_password):
            raise ConfigError("download_auth=basic needs download_user and download_password")
        if self.default_stage not in self.stages:
            raise ConfigError(f"default_stage {self.default_stage!r} is not one of stages {self.stages}")
        if not self.context.strip("/") or "/" in self.context.strip("/"):
            raise ConfigError(f"context must be one path segment, got {self.context!r}")
        self.context = self.context.strip("/")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public_url must start with http:// or https://, got {self.public_url!r}")
        for remote in self.leaf_remotes:
            if not remote.startswith(("nats-leaf://", "nats://", "tls://", "ws://", "wss://")):
                raise ConfigError(f"leaf remote {remote!r} must be a URL such as nats-leaf://HOST:PORT")
        if not 1 <= self.http_workers <= 64:
            raise ConfigError("http_workers must be between 1 and 64")
        if not 8 * 1024 <= self.http_max_header_bytes <= 1 << 20:
            raise ConfigError("http_max_header_bytes must be between 8192 and 1048576")
        if not 0 < self.http_header_timeout_s <= 300:
            raise ConfigError("http_header_timeout_s must be more than 0 and at most 300")
        if not 1 <= self.http_keepalive_s <= 3600:
            raise ConfigError("http_keepalive_s must be between 1 and 3600")
        if not 0.1 <= self.apply_wait_s <= 3600:
            raise ConfigError("apply_wait_s must be between 0.1 and 3600 seconds")
        if not 0 < self.send_timeout_s <= 3600:
            raise ConfigError("send_timeout_s must be more than 0 and at most 3600")
        if not 0 < self.body_timeout_s <= 3600:
            raise ConfigError("body_timeout_s must be more than 0 and at most 3600")
        if not 1 <= self.uploads_per_user <= 10_000:
            raise ConfigError("uploads_per_user must be between 1 and 10000")
        if self.withdraw_grace_s < 0:
            raise ConfigError("withdraw_grace_s must be 0 or more seconds")
        if self.stream_replicas not in (1, 3, 5):
            raise ConfigError("stream_replicas must be 1, 3 or 5 (NATS replicates to an odd number of nodes)")
        if self.stream_replicas > 1 and not self.nats:
            raise ConfigError("stream_replicas > 1 needs a NATS cluster: pass --nats with its node URLs")
        if not 1 <= self.webhook_max_attempts <= 100:
            raise ConfigError("webhook_max_attempts must be between 1 and 100")
        if not 0 < self.webhook_backoff_s <= 300:
            raise ConfigError("webhook_backoff_s must be more than 0 and at most 300")
        if self.notify_email_digest_s < 1:
            raise ConfigError("notify_email_digest_s must be at least 1 second")
        if self.cookie_secure not in ("auto", "always", "never"):
            raise ConfigError("cookie_secure must be auto, always or never")
        if self.session_idle_s < 60 or self.session_max_s < self.session_idle_s:
            raise ConfigError("session_idle_s must be at least 60 and session_max_s at least session_idle_s")
        if min(self.signin_max_failures, self.signin_max_failures_address, self.signin_window_s) < 1:
            raise ConfigError("signin_max_failures, signin_max_failures_address and signin_window_s must be at least 1")
        import ipaddress
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies entry {proxy!r} is not an IP address or network") from None
        if self.ldap_url and not self.ldap_url.startswith(("ldap://", "ldaps://")):
            raise ConfigError(f"ldap_url must start with ldap:// or ldaps://, got {self.ldap_url!r}")
        if self.ldap_url and not self.ldap_user_base:
            raise ConfigError("ldap_url needs ldap_user_base (where to search for users)")
        if self.ldap_starttls and self.ldap_url.startswith("ldaps://"):
            raise ConfigError("ldap_starttls upgrades ldap://; ldaps:// is TLS already")
        for entry in self.ldap_role_map:
            group, _, role = entry.rpartition("=")
            if not group or role not in ("admin", "operator", "auditor"):
                raise ConfigError(f"ldap_role_map entry {entry!r} must be GROUP=admin|operator|auditor")
        if "{username}" not in self.ldap_user_filter:
            raise ConfigError("ldap_user_filter must contain {username}")
        if self.ldap_recheck_s < 1:
            raise ConfigError("ldap_recheck_s must be at least 1")
        if not 0 < self.ldap_timeout_s <= 120:
            raise ConfigError("ldap_timeout_s must be more than 0 and at most 120")
        if self.scrub_period_s < 0:
            raise ConfigError("scrub_period_s must be 0 (no background scrub) or more")
        if not 1 <= self.scrub_min_rate <= self.scrub_max_rate:
            raise ConfigError("scrub_min_rate must be at least 1 and at most scrub_max_rate (bytes per second)")
        if self.jamf_url:
            if not self.jamf_url.startswith(("https://", "http://")):
                raise ConfigError(f"jamf_url must start with https:// (or http://), got {self.jamf_url!r}")
            if not (self.jamf_client_id or self.jamf_user):
                raise ConfigError("jamf_url needs jamf_client_id (an API client) or jamf_user")
        if self.jamf_hash_type not in ("SHA_512", "SHA3_512", "MD5"):
            raise ConfigError("jamf_hash_type must be SHA_512, SHA3_512 or MD5")
        if self.jamf_url and self.jamf_stage not in self.stages:
            raise ConfigError(f"jamf_stage {self.jamf_stage!r} is not one of stages {self.stages}")
        if self.jamf_quorum < 0 or self.jamf_check_interval_s < 1:
            raise ConfigError("jamf_quorum must be 0 or more and jamf_check_interval_s at least 1")
        unknown = [s for s in self.accept_stages if s not in self.stages]
        if unknown:
            raise ConfigError(f"accept_stages {unknown} are not among stages {self.stages}")
        self.allowed_extensions = [e.lower() if e.startswith(".") else "." + e.lower()
                                   for e in self.allowed_extensions]
        if self.timezone:
            import zoneinfo
            try:
                zoneinfo.ZoneInfo(self.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        return self


def _check_address(name: str, value: str, any_port: bool = False) -> None:
    """HOST:PORT with a port 1-65535 (or -1, any free port, where the broker allows it)."""
    if not value and name != "http":
        return
    host, sep, port = value.rpartition(":")
    ok = sep and host and (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
                           or any_port and port == "-1")
    if not ok:
        raise ConfigError(f"{name} must be HOST:PORT with a port from 1 to 65535, got {value!r}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    target = f.type if isinstance(f.type, type) else str(f.type)
    if isinstance(value, str):
        if target in ("int", int):
            try:
                return int(value)
            except ValueError as exc:
                raise ConfigError(f"{f.name} must be a whole number, got {value!r}") from exc
        if target in ("float", float):
            try:
                return float(value)
            except ValueError as exc:
                raise ConfigError(f"{f.name} must be a number, got {value!r}") from exc
        if target in ("bool", bool):
            if value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if value.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        if target in ("list[str]",):
            return [v.strip() for v in value.split(",") if v.strip()]
        if target in ("Path", Path):
            return Path(value)
    if target in ("Path", Path) and not isinstance(value, Path):
        return Path(value)
    return value


def settings_env(settings: Settings) -> dict[str, str]:
    """The ODST_* environment that makes ``load`` give these settings back (a process started
    by this one, such as ``odst serve``'s extra gateway processes, runs with the same choices)."""
    out = {}
    for f in fields(Settings):
        v = getattr(settings, f.name)
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        out[f"ODST_{f.name.upper()}"] = str(v)
    return out


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: Path | None = None) -> Settings:
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    data = flags.get("data") or env.get("ODST_DATA") or Settings.data
    candidates = [config_file] if config_file else [Path(data) / "odst.toml"]
    for path in candidates:
        if path and Path(path).exists():
            try:
                toml = tomllib.loads(Path(path).read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
            for k, v in toml.items():
                k = k.replace("-", "_")
                if k not in by_name:
                    raise ConfigError(f"{path}: unknown setting {k!r}")
                values[k] = _coerce(by_name[k], v)
        elif config_file:
            raise ConfigError(f"config file {config_file} does not exist")
    for name, f in by_name.items():
        v = env.get(f"ODST_{name.upper()}")
        if v is not None and v != "":
            values[name] = _coerce(f, v)
    for name, v in flags.items():
        if name in by_name:
            values[name] = _coerce(by_name[name], v)
    return Settings(**values).validate()
