// One line of plain words per event type, for the event log and a package's history.

import { fmtBytes, fmtTime } from './dom.js';

export const EVENT_TYPES = [
  'SiteFounded', 'PackageUploaded', 'PackageAvailable', 'PackagesAvailable', 'PackageTransferFailed', 'PackageStaged',
  'PackageDeleted', 'PeerInvited', 'PeerRegistered', 'PeerRemoved', 'PeerLogDiverged', 'PeerLogRestored', 'TokenCreated', 'TokenRevoked',
  'WebhookSubscribed', 'WebhookRemoved', 'EmailSubscribed', 'EmailUnsubscribed', 'UserCreated',
  'UserRoleChanged', 'UserPasswordChanged', 'UserDetailsChanged', 'UserRemoved', 'StagesAccepted',
  'NatsCredentialCreated', 'NatsCredentialRevoked', 'ChunkRejected', 'PackageDamaged',
  'JamfPackageSynced', 'JamfDistributionPointRegistered', 'JamfDriftDetected', 'JamfDriftCleared', 'PackageReplaced', 'SiteRenamed',
  'LinkBandwidthSet', 'LinkBandwidthCleared', 'LocalNetworksSet', 'DownloadCapsSet', 'PackageUrgencySet', 'PackageWithdrawn',
];

const rate = (bps) => (bps ? `${(bps / 1e6).toLocaleString(undefined, { maximumFractionDigits: 2 })} MB/s` : 'unlimited');
const linkName = (link, site) => (link === '*' ? 'every link (network default)' : `the link to ${site(link)}`);

const NAMES_SHOWN = 5;  // of a PackagesAvailable's packages, named in its line
const namesOf = (items) => {
  const more = items.length - NAMES_SHOWN;
  return items.slice(0, NAMES_SHOWN).map((i) => i.name).join(', ') + (more > 0 ? ` and ${more} more` : '');
};

const DRIFT_WORDS = { missing: 'has no record', hash_differs: 'has a record whose hash differs', no_file: 'has a record for a file no site holds' };

export function summary(item, ctx) {
  const e = (item.envelope && item.envelope.event) || {};
  const site = (id) => ctx.siteName(id);
  switch (item.type) {
    case 'SiteFounded': return `Site ${e.name ? `${e.name} ` : ''}(${e.site}) founded`;
    case 'PackageUploaded': return `Uploaded ${e.name} (${fmtBytes(e.size)}) in stage ${e.stage}`;
    case 'PackageReplaced': return `Replaced ${e.name} with new content (${fmtBytes(e.size)}, version ${e.generation + 1}) in stage ${e.stage}`;
    case 'PackageAvailable': return `${site(item.origin)} holds a verified copy of ${e.name}`;
    case 'PackagesAvailable': return `${site(item.origin)} holds verified copies of ${namesOf(e.items || [])}`;
    case 'PackageTransferFailed': return `${site(item.origin)} could not fetch ${e.name}: ${e.reason}`;
    case 'ChunkRejected': return `${site(item.origin)} dropped chunk ${e.chunk} of ${e.name} from ${site(e.source)}: it failed verification`;
    case 'PackageDamaged': return `${site(item.origin)}'s copy of ${e.name} is out of service (found by ${e.found_by || 'a check'}): ${e.reason}`;
    case 'PackageWithdrawn': return `${site(item.origin)} removed its copy of ${e.name}: ${e.reason}`;
    case 'PackageStaged': return `${e.name}: stage ${e.previous || '?'} → ${e.stage}`;
    case 'PackageDeleted': return `Deleted ${e.name}`;
    case 'PeerInvited': return `Invitation ${e.invite_id} created, valid until ${fmtTime(e.expires_ts)}`;
    case 'PeerRegistered': return `Registered site ${e.name ? `${e.name} ` : ''}(${e.site})`;
    case 'PeerRemoved': return `Stopped trusting site ${e.site} after its event ${e.upto_seq}`;
    case 'PeerLogDiverged': return `Site ${e.site}'s log no longer matches this site's copy (kept): ${e.reason}`;
    case 'PeerLogRestored': return `Site ${e.site}'s log matches this site's copy again`;
    case 'TokenCreated': return `API token “${e.name}” (${e.role}) created`;
    case 'TokenRevoked': return `API token ${e.token_id} revoked`;
    case 'NatsCredentialCreated': return `Event subscriber “${e.name}” (${e.role}) may read the log over NATS`;
    case 'NatsCredentialRevoked': return `Event subscriber ${e.credential_id} revoked`;
    case 'WebhookSubscribed': return `Webhook ${e.webhook_id} → ${e.url} for ${(e.event_types || []).join(', ')}`;
    case 'WebhookRemoved': return `Webhook ${e.webhook_id} removed`;
    case 'EmailSubscribed': return `Email digests to ${e.recipient} for ${(e.event_types || []).join(', ')}`;
    case 'EmailUnsubscribed': return `Email subscription ${e.subscription_id} removed`;
    case 'UserCreated': return `User ${e.username} created (${e.role})`;
    case 'UserRoleChanged': return `User ${e.username} is now ${e.role}`;
    case 'UserPasswordChanged': return `Password of ${e.username} changed`;
    case 'UserDetailsChanged': return `User ${e.username} renamed “${e.display_name}”`;
    case 'UserRemoved': return `User ${e.username} removed`;
    case 'StagesAccepted': return `${site(item.origin)} now replicates stages ${(e.stages || []).join(', ')}`;
    case 'JamfPackageSynced': return e.result === 'failed'
      ? `Jamf Pro record of ${e.name} not written: ${e.detail}`
      : `Jamf Pro record of ${e.name}${e.record_id ? ` (id ${e.record_id})` : ''}: ${e.action}${e.dry_run ? ' (dry run)' : ''}, ${e.hash_type} ${String(e.hash_value || '').slice(0, 16)}…`;
    case 'JamfDistributionPointRegistered': return `Jamf Pro distribution point “${e.dp_name}” ${e.action} for ${site(e.site)} (${e.url}, ${e.api} API)`;
    case 'JamfDriftDetected': return `Jamf Pro ${DRIFT_WORDS[e.kind] || e.kind} for ${e.name}`;
    case 'JamfDriftCleared': return `Jamf Pro's record of ${e.name} is in sync again`;
    case 'LinkBandwidthSet': return `${site(item.origin)} limits ${linkName(e.link, site)}: send ${rate(e.send_bps)}, receive ${rate(e.receive_bps)}`
      + `${(e.windows || []).length ? `, ${(e.windows || []).length} timetable window(s)` : ''}${e.local && e.local !== 'auto' ? `, local: ${e.local}` : ''}`;
    case 'LinkBandwidthCleared': return `${site(item.origin)} removed its limits on ${linkName(e.link, site)}`;
    case 'LocalNetworksSet': return `${site(item.origin)} counts ${(e.cidrs || []).join(', ') || 'no networks'} as local (${e.exempt ? 'exempt from limits' : 'limited'})`;
    case 'DownloadCapsSet': return `${site(item.origin)} caps Mac downloads: egress ${rate(e.egress_bps)}, ${e.max_concurrent || 'no cap'} at once, ${e.per_client || 'no cap'} per client`;
    case 'PackageUrgencySet': return `${e.name} ${e.urgent ? 'marked urgent' : 'no longer urgent'} by ${item.actor}${e.reason ? `: ${e.reason}` : ''}`;
    case 'SiteRenamed': return `Site ${item.origin} is now called “${e.name}”`;
    default: return item.type;
  }
}

// The package an event is about, if any.
export function packageOf(item) {
  const e = (item.envelope && item.envelope.event) || {};
  return item.type && (item.type.startsWith('Package') || (item.type.startsWith('Jamf') && item.type !== 'JamfDistributionPointRegistered')) ? e.name : null;
}
