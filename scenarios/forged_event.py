"""A forged event injected into a site's own stream is quarantined by every site and never applied.

A and B are registered (hub A, spoke B). Someone with access to A's NATS
publishes, on A's event subject, a PackageUploaded that claims to come from A,
perfectly chained onto A's last event, but sealed with a different key. A and
B (which mirrors A) both list it in GET /api/v1/quarantine and never show the
forged package; A's next genuine upload still reaches B (the chain is intact).
"""

from __future__ import annotations

import base64
import hashlib

import nacl.signing

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.signing import SiteKey
from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b = net.hub("A", ["B"])
    net.start()
    net.register(a, b)
    net.upload(a, "genuine-1.pkg", MiB)
    net.wait_converged()

    with net.step("forge a PackageUploaded from A, sealed with another key, into A's stream"):
        last = net.get(a, "/api/v1/events", params={"origin": a.id, "limit": 1000})["events"][-1]
        signed = base64.b64decode(last["signed"])
        mallory = SiteKey(nacl.signing.SigningKey.generate())
        data = b"not what it claims to be" * 1000
        chunks = [hashlib.sha1(data).hexdigest()]
        envelope = codec.Envelope(
            id=codec.new_event_id(), origin=a.id, seq=last["seq"] + 1, prev=codec.chain_hash(signed),
            ts=codec.now_ms(), actor="admin",
            event=ev.PackageUploaded(name="forged.pkg", size=len(data), sha1=hashlib.sha1(data).hexdigest(),
                                     sha512=hashlib.sha512(data).hexdigest(), blake3="0" * 64,
                                     chunk_size=MiB, chunks=chunks, stage="prod"))
        ack = net.nats_publish(a, f"odst.{a.id}.ev.PackageUploaded", codec.seal(envelope, mallory),
                               stream="EVENTS")
        net.say(f"  published into A's EVENTS stream at seq {ack.seq} (envelope seq {envelope.seq}, "
                f"chained onto A's seq {last['seq']}, signed by {mallory.site_id} instead of {a.id})")

    for site in (a, b):
        def quarantined(site=site):
            q = net.get(site, "/api/v1/quarantine")["quarantine"]
            return [e for e in q if e["origin"] == a.id and e["subject"].endswith(".PackageUploaded")]
        entries = net.wait_until(quarantined, 30, f"{site.name} to quarantine the forged event", sites=[a, b])
        net.say(f"  {site.name} quarantined it: stream {entries[0]['stream']} seq {entries[0]['stream_seq']}: "
                f"{entries[0]['reason']}")

    net.upload(a, "genuine-2.pkg", 2 * MiB)
    net.wait_available("genuine-2.pkg", [b])
    net.wait_converged()
    with net.step("neither site shows the forged package"):
        for site in (a, b):
            net.check(net.package(site, "forged.pkg") is None, f"{site.name} shows forged.pkg", [site])
            names = [p["name"] for p in net.state(site)["packages"]]
            net.check("forged.pkg" not in names, f"{site.name}'s state lists forged.pkg: {names}", [site])
            net.check(not site.file("forged.pkg").exists(), f"{site.name} has a forged.pkg file", [site])
            listed = [p["name"] for p in net.get(site, "/api/v1/packages")["packages"]]
            net.check("forged.pkg" not in listed, f"{site.name} lists forged.pkg: {listed}", [site])
        net.say("  forged.pkg appears nowhere; genuine-2.pkg, uploaded after the forgery, replicated")
    net.check_files()
