"""What ODST writes into Jamf Pro, as pure functions: package record bodies, distribution point
records (Jamf Pro API and Classic XML), and the decisions of the sync and the drift check.

Shapes follow Jamf Pro's API reference (packages: 11.5+; distribution points: 11.16+, older
servers the Classic ``/JSSResource/distributionpoints``); the tests' stand-in server checks
them against the ``jamf-pro-sdk`` models.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

NOTES_MARK = "Managed by ODST"  # first words of the notes of a record ODST wrote

# A new record's settings beyond what ODST knows: Jamf Pro's own defaults for a package.
PACKAGE_DEFAULTS = {
    "categoryId": "-1", "info": "", "priority": 10, "osRequirements": "", "fillUserTemplate": False,
    "indexed": False, "fillExistingUsers": False, "swu": False, "rebootRequired": False,
    "selfHealNotify": False, "selfHealingAction": "nothing", "osInstall": False, "serialNumber": "",
    "parentPackageId": "-1", "basePath": "", "suppressUpdates": False, "cloudTransferStatus": "NOT_APPLICABLE",
    "ignoreConflicts": False, "suppressFromDock": False, "suppressEula": False, "suppressRegistration": False,
    "installLanguage": "en_US", "md5": None, "sha256": None, "osInstallerVersion": "", "manifest": "",
    "manifestFileName": "", "format": "",
}


@dataclass(frozen=True)
class Wanted:
    """A package's record as ODST wants it: its file name, size and hash of the content served."""

    name: str
    blake3: str
    size: int
    hash_type: str
    hash_value: str
    notes: str = ""


def package_body(want: Wanted, existing: dict | None = None) -> dict:
    """The body of POST/PUT /api/v1/packages: ODST's fields over the existing record's (an admin's
    category, priority, info and install options stay), Jamf Pro's defaults for a new one."""
    body = dict(PACKAGE_DEFAULTS)
    if existing:
        body.update({k: v for k, v in existing.items() if k in PACKAGE_DEFAULTS or k in ("packageName", "notes")})
    body.update({
        "packageName": (existing or {}).get("packageName") or want.name,
        "fileName": want.name,
        "hashType": want.hash_type,
        "hashValue": want.hash_value,
        "size": str(want.size),
        "notes": want.notes if not existing or not (existing.get("notes") or "").strip()
        or (existing.get("notes") or "").startswith(NOTES_MARK) else existing["notes"],
    })
    if want.hash_type == "MD5":  # PreStage enrollment reads the md5 field
        body["md5"] = want.hash_value
    body.pop("id", None)
    return body


def record_action(want: Wanted, record: dict | None) -> str:
    """create | update | unchanged: what the sync must do for a package given its record."""
    if record is None:
        return "create"
    same = (record.get("hashType") == want.hash_type and (record.get("hashValue") or "").lower() == want.hash_value
            and str(record.get("size") or "") in ("", str(want.size)))
    return "unchanged" if same else "update"


def drift_kind(want: Wanted | None, record: dict | None) -> str:
    """in_sync | missing | hash_differs | no_file for one name (``want`` None: no site holds the file)."""
    if want is None:
        return "no_file" if record is not None else "in_sync"
    if record is None:
        return "missing"
    if (record.get("hashType") != want.hash_type
            or (record.get("hashValue") or "").lower() != want.hash_value.lower()):
        return "hash_differs"
    return "in_sync"


@dataclass(frozen=True)
class DistributionPoint:
    """One site as a Jamf Pro file share distribution point that serves over HTTP(S) only."""

    name: str
    public_url: str  # the site's public URL (https://host[:port][/prefix])
    context: str  # ODST's context, e.g. CasperShare
    user: str = ""  # download auth (download_auth=basic), else none
    password: str = ""
    failover_id: str = "-1"  # Jamf Pro API: the failover DP's record id
    failover_name: str = ""  # Classic API: the failover DP's name

    @property
    def https(self) -> bool:
        """HTTPS when the site's public URL is (the Jamf Pro API's DP records are HTTPS-only)."""
        return urlsplit(self.public_url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.public_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.public_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path_context(self) -> str:
        """What Jamf Pro puts between host:port and /Packages: any path prefix plus the context."""
        prefix = urlsplit(self.public_url).path.strip("/")
        return f"{prefix}/{self.context}" if prefix else self.context

    @property
    def url(self) -> str:
        scheme = "https" if self.https else "http"
        return f"{scheme}://{self.host}:{self.port}/{self.path_context}"


def dp_body(dp: DistributionPoint) -> dict:
    """POST/PUT /api/v1/distribution-points (Jamf Pro 11.16+): no file sharing, HTTP(S) downloads."""
    return {
        "name": dp.name, "serverName": dp.host, "principal": False, "backupDistributionPointId": dp.failover_id,
        "fileSharingConnectionType": "NONE", "httpsEnabled": True, "httpsPort": dp.port,
        "httpsContext": dp.path_context,
        "httpsSecurityType": "USERNAME_PASSWORD" if dp.user else "NONE",
        **({"httpsUsername": dp.user, "httpsPassword": dp.password} if dp.user else {}),
        "enableLoadBalancing": False,
    }


def dp_xml(dp: DistributionPoint) -> str:
    """The Classic API's <distribution_point> (servers before 11.16)."""
    fields = {
        "name": dp.name, "ip_address": dp.host, "is_master": "false", "connection_type": "None",
        "http_downloads_enabled": "true", "protocol": "https" if dp.https else "http", "port": str(dp.port),
        "context": dp.path_context, "http_url": dp.url,
        "no_authentication_required": "false" if dp.user else "true",
        "username_password_required": "true" if dp.user else "false",
        "failover_point": dp.failover_name,
    }
    if dp.user:
        fields.update({"http_username": dp.user, "http_password": dp.password})
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items())
    return f"<distribution_point>{inner}</distribution_point>"


# --------------------------------------------------------------------------- Classic packages
# Jamf Pro before 11.5 has no /api/v1/packages: its package records are the Classic API's
# <package> (/JSSResource/packages), found by display name, with filename/hash_type/hash_value.


def classic_package(text: str) -> dict:
    """A Classic <package> record read into the Jamf Pro API's field names (no size: Classic has none)."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # no entity expansion from a server's answer
        raise ValueError("a Classic API answer with a DOCTYPE")
    root = ElementTree.fromstring(text)
    if root.tag != "package":
        raise ValueError(f"a Classic API answer with <{root.tag}>, not <package>")
    f = {c.tag: (c.text or "") for c in root}
    return {"id": f.get("id", ""), "packageName": f.get("name", ""), "fileName": f.get("filename", ""),
            "hashType": f.get("hash_type") or None, "hashValue": f.get("hash_value") or None,
            "notes": f.get("notes", "")}


def classic_package_ids(text: str) -> list[tuple[str, str]]:
    """(id, name) of every record in GET /JSSResource/packages."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("a Classic API answer with a DOCTYPE")
    root = ElementTree.fromstring(text)
    return [(p.findtext("id") or "", p.findtext("name") or "") for p in root.iter("package")]


def package_xml(want: Wanted, existing: dict | None = None) -> str:
    """POST/PUT /JSSResource/packages/id/N: only ODST's elements (a Classic PUT changes just the
    elements it carries, so an admin's category, priority and options stay)."""
    notes = existing.get("notes", "") if existing else ""
    fields = {
        "name": (existing or {}).get("packageName") or want.name,
        "filename": want.name,
        "hash_type": want.hash_type,
        "hash_value": want.hash_value,
        "notes": want.notes if not notes.strip() or notes.startswith(NOTES_MARK) else notes,
    }
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items())
    return f"<package>{inner}</package>"
