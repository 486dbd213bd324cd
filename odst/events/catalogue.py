"""Every state change ODST knows, as one tagged union of frozen msgspec Structs.

Rules: a field's type never changes; new fields get defaults;
a changed meaning is a new event. The tag (``type``) is the class name.
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event; never published itself."""


class SiteFounded(Event, tag=True):
    """First event of a site's log: binds the site id to its public key."""

    site: str
    public_key: str  # hex, ed25519
    name: str = ""


class ContentEvent(Event):
    """Base of the events that carry a package's content: its name, then the manifest
    (``store.hashing.Manifest``: ``Manifest.of(event)``, ``manifest.event_fields()``), in the
    order these fields have always had on the wire. Never published itself."""

    name: str
    size: int
    sha1: str
    sha512: str
    blake3: str
    chunk_size: int
    chunks: list[str]  # SHA1 hex of every chunk, in order


class PackageUploaded(ContentEvent, tag=True):
    """A verified package was published at the origin site (its manifest)."""

    stage: str = "prod"


class PackageReplaced(ContentEvent, tag=True):
    """New content was published at the origin site under an existing name, superseding
    ``replaces`` (the content current there). ``generation`` is one more than the superseded
    content's: the highest generation is current, and concurrent replacements of the same
    content resolve as concurrent uploads do (the earliest wins). Every site keeps serving
    the content it holds until it holds this one verified (``odst.events.uploads``)."""

    stage: str
    replaces: str  # blake3 of the content superseded
    generation: int


class PackageAvailable(ContentEvent, tag=True):
    """This site (the envelope's origin) now holds a verified copy of the content.

    Carries the whole manifest and the content's upload clock (``origin``,
    ``uploaded_ts``) so a site that never saw the upload can still replicate
    from here and resolve conflicts exactly as everyone else does.
    """

    stage: str
    origin: str
    uploaded_ts: int
    uploaded_by: str = ""


class PackagesAvailable(Event, tag=True):
    """This site (the envelope's origin) now holds verified copies of several contents, pulled
    together (small packages: a catch-up, a burst of uploads). Each item says exactly what a
    PackageAvailable of its own would, and is folded as that event would be; one signed
    event for a batch costs every site that folds it one signature check, one broker write
    and one chain link instead of one per package."""

    items: list[PackageAvailable]


class PackageTransferFailed(Event, tag=True):
    """This site gave up fetching a content for now (it retries later)."""

    name: str
    blake3: str
    reason: str


class ChunkRejected(Event, tag=True):
    """This site (the envelope's origin) dropped a chunk ``source`` served it: the chunk
    failed its SHA1. A report, not a verdict: ``source`` re-checks its own copy when it
    sees this in its mirror of this log, and acts only on what it finds itself."""

    source: str
    name: str
    blake3: str
    chunk: int
    reason: str = ""


class PackageDamaged(Event, tag=True):
    """This site's stored copy of a content failed its own re-check (a scrub, ``odst
    verify``, or a re-check a peer's ChunkRejected asked for): it is out of service here
    (downloads answer 503, peers are not sent its chunks) until a verified copy is pulled
    from a peer and PackageAvailable says so."""

    name: str
    blake3: str
    reason: str
    found_by: str = ""  # scrub | verify | report


class PackageWithdrawn(Event, tag=True):
    """This site removed its copy of a content whose stage it no longer accepts (demoted, or the
    site's accepted stages changed), once the grace period had passed; pulled again if accepted."""

    name: str
    blake3: str
    reason: str


class PackageStaged(Event, tag=True):
    """A package's stage changed (e.g. promoted from test to prod)."""

    name: str
    stage: str
    previous: str = ""


class PackageDeleted(Event, tag=True):
    """A package was deleted; the tombstone names the content it removed."""

    name: str
    blake3: str


class PeerInvited(Event, tag=True):
    """An invitation for another site to register with this one (only the secret's hash)."""

    invite_id: str
    secret_sha256: str
    expires_ts: int


class PeerRegistered(Event, tag=True):
    """This site trusts ``site``'s key; other sites learn the peer from this event too."""

    site: str
    public_key: str  # hex
    name: str = ""
    http_url: str = ""
    invite_id: str = ""


class PeerRemoved(Event, tag=True):
    """This site stops trusting ``site``: its events after ``upto_seq`` are ignored here."""

    site: str
    upto_seq: int


class PeerLogDiverged(Event, tag=True):
    """This site's mirror of ``site``'s log no longer matches what that site holds: its
    stream is gone, shorter than the copy, cut at the head, or reconfigured. The mirror is
    kept, unchanged, as evidence; an admin decides what happens next."""

    site: str
    reason: str
    mirror_last_seq: int = 0
    origin_first_seq: int = 0
    origin_last_seq: int = 0


class PeerLogRestored(Event, tag=True):
    """``site``'s log matches this site's mirror of it again."""

    site: str


class TokenCreated(Event, tag=True):
    """An API token was issued; only its SHA-256 is ever stored."""

    token_id: str
    name: str
    role: str
    token_sha256: str


class TokenRevoked(Event, tag=True):
    token_id: str


class NatsCredentialCreated(Event, tag=True):
    """A downstream service may read this site's events over NATS as ``name``.

    Only the public user NKey ('U…') is stored: the seed was shown once to whoever
    created it. ``role`` names the permission set (``odst.bus.authorization``); the
    only one so far is ``subscriber`` (read-only).
    """

    credential_id: str
    name: str
    nkey: str  # public user NKey
    role: str = "subscriber"


class NatsCredentialRevoked(Event, tag=True):
    credential_id: str


class WebhookSubscribed(Event, tag=True):
    """This site POSTs the listed event types to ``url``.

    No secret is stored: the signing key is derived, HMAC-SHA256(site private
    seed, webhook id) (``odst.notify.signing``), because this log is mirrored by
    every peer site and a stored secret would reach all of them.
    """

    webhook_id: str
    url: str
    event_types: list[str]
    description: str = ""


class WebhookRemoved(Event, tag=True):
    webhook_id: str


class EmailSubscribed(Event, tag=True):
    """``recipient`` gets a digest mail of the listed event types."""

    subscription_id: str
    recipient: str
    event_types: list[str]


class EmailUnsubscribed(Event, tag=True):
    subscription_id: str


class UserCreated(Event, tag=True):
    """A local user of the web UI and API, created by ``actor``.

    ``password_sealed`` is the argon2id hash sealed with a key derived from this
    site's private seed (``odst.accounts.passwords``): peers mirror this log, and
    a bare hash would hand every peer an offline guessing target.
    """

    username: str
    role: str
    password_sealed: str
    display_name: str = ""


class UserRoleChanged(Event, tag=True):
    username: str
    role: str


class UserPasswordChanged(Event, tag=True):
    """A new sealed argon2id hash; sessions signed in before it end."""

    username: str
    password_sealed: str


class UserDetailsChanged(Event, tag=True):
    username: str
    display_name: str


class UserRemoved(Event, tag=True):
    username: str


class StagesAccepted(Event, tag=True):
    """This site now replicates packages in these stages (chosen in the web UI or API).

    Overrides the ``accept_stages`` setting from then on; the setting stays the
    starting point of a site that never chose.
    """

    stages: list[str]


class JamfPackageSynced(Event, tag=True):
    """This site wrote (or, in a dry run, would write) a package's Jamf Pro record.

    ``action``: created | updated | unchanged | deleted; ``result``: ok | failed (``detail``
    says why). No credential is ever in it: only the record and the hash it carries."""

    name: str
    blake3: str
    file_name: str
    record_id: str
    hash_type: str
    hash_value: str
    size: int
    action: str
    result: str = "ok"
    detail: str = ""
    dry_run: bool = False
    created_by_odst: bool = False  # the record is ODST's own (only those may ever be deleted)


class JamfDistributionPointRegistered(Event, tag=True):
    """A Jamf Pro distribution point record for ``site`` was created or updated."""

    site: str
    record_id: str
    dp_name: str
    url: str
    api: str  # pro | classic
    action: str  # created | updated
    failover_site: str = ""


class JamfDriftDetected(Event, tag=True):
    """Jamf Pro's record and ODST disagree. ``kind``: missing (no record), hash_differs,
    no_file (the record names a file no site holds)."""

    name: str
    kind: str
    record_id: str = ""
    expected: str = ""
    found: str = ""


class JamfDriftCleared(Event, tag=True):
    """A package's Jamf Pro record and ODST agree again."""

    name: str
    record_id: str = ""


class TimeWindow(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a link's weekly timetable, in the deciding site's time zone: on ``days``
    (mon..sun) from ``start`` to ``end`` (HH:MM; an end at or before the start runs past
    midnight) the link carries ``limit_bps`` bytes per second (0: unlimited), or nothing
    when ``paused``."""

    days: list[str]
    start: str
    end: str
    limit_bps: int = 0
    paused: bool = False


class LinkBandwidthSet(Event, tag=True):
    """The origin site limits its replication traffic with peer ``link`` (a site id, or
    ``*``: the network-wide default for links without their own). Rates in bytes per second,
    0: unlimited; ``burst_bytes`` 0: the default; ``local``: auto (by the local networks),
    yes (never limited) or no (always limited)."""

    link: str
    send_bps: int = 0
    receive_bps: int = 0
    burst_bytes: int = 0
    windows: list[TimeWindow] = []
    local: str = "auto"


class LinkBandwidthCleared(Event, tag=True):
    """The origin site's own limits for ``link`` (or the default, ``*``) are gone."""

    link: str


class LocalNetworksSet(Event, tag=True):
    """What the origin site counts as local (never limited when ``exempt``)."""

    exempt: bool = True
    cidrs: list[str] = []


class DownloadCapsSet(Event, tag=True):
    """The origin site's caps on Mac downloads (0: none): total egress in bytes per
    second, downloads at once, downloads at once per client address."""

    egress_bps: int = 0
    max_concurrent: int = 0
    per_client: int = 0


class PackageUrgencySet(Event, tag=True):
    """A package is (or no longer is) urgent: it crosses closed windows and limits. The
    envelope's actor is who marked it."""

    name: str
    urgent: bool
    reason: str = ""
class SiteRenamed(Event, tag=True):
    """This site (the envelope's origin) goes by ``name`` from now on, in its UI, its
    peers' UIs and its mail; chosen in the web UI or API, it overrides the ``site_name``
    setting. The site id never changes."""

    name: str


AnyEvent = (SiteFounded | PackageUploaded | PackageAvailable | PackagesAvailable | PackageTransferFailed | PackageStaged
            | PackageDeleted | PeerInvited | PeerRegistered | PeerRemoved | TokenCreated | TokenRevoked
            | WebhookSubscribed | WebhookRemoved | EmailSubscribed | EmailUnsubscribed | UserCreated
            | UserRoleChanged | UserPasswordChanged | UserDetailsChanged | UserRemoved | StagesAccepted
            | PeerLogDiverged | PeerLogRestored
            | NatsCredentialCreated | NatsCredentialRevoked | ChunkRejected | PackageDamaged
            | JamfPackageSynced | JamfDistributionPointRegistered | JamfDriftDetected | JamfDriftCleared
            | PackageReplaced | SiteRenamed
            | LinkBandwidthSet | LinkBandwidthCleared | LocalNetworksSet | DownloadCapsSet
            | PackageUrgencySet | PackageWithdrawn)

EVENT_TYPES: tuple[type[Event], ...] = (
    SiteFounded,
    PackageUploaded,
    PackageAvailable,
    PackagesAvailable,
    PackageTransferFailed,
    PackageStaged,
    PackageDeleted,
    PeerInvited,
    PeerRegistered,
    PeerRemoved,
    TokenCreated,
    TokenRevoked,
    WebhookSubscribed,
    WebhookRemoved,
    EmailSubscribed,
    EmailUnsubscribed,
    UserCreated,
    UserRoleChanged,
    UserPasswordChanged,
    UserDetailsChanged,
    UserRemoved,
    StagesAccepted,
    NatsCredentialCreated,
    NatsCredentialRevoked,
    PeerLogDiverged,
    PeerLogRestored,
    ChunkRejected,
    PackageDamaged,
    JamfPackageSynced,
    JamfDistributionPointRegistered,
    JamfDriftDetected,
    JamfDriftCleared,
    LinkBandwidthSet,
    LinkBandwidthCleared,
    LocalNetworksSet,
    DownloadCapsSet,
    PackageUrgencySet,
    PackageReplaced,
    SiteRenamed,
    PackageWithdrawn,
)
