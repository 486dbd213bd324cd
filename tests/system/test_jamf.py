"""Jamf Pro integration against the stand-in Jamf Pro server (tests/jamf_standin.py): real
``odst serve`` processes, real HTTP; every body ODST sends is checked against jamf-pro-sdk's
models by the stand-in, and every test ends by asserting it found nothing wrong.

Tokens live 2 s here, so every story outlives several of them (renewal before expiry), and
``revoke_tokens`` makes Jamf Pro refuse a token mid-operation (renewal on 401)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading

import pytest

from harness.macs import Mac
from odst.jamf.digests import Digests, digests_path
from harness.network import Network
from tests.browser import sign_in
from tests.conftest import ADMIN_TOKEN, run_odst, upload_bytes, wait_until
from tests.jamf_standin import CLIENT_ID, CLIENT_SECRET, JamfStandin
from tests.system.test_notifications import FAST_RETRY, receiver, subscribe  # noqa: F401 (fixture)


@pytest.fixture
def standin():
    server = JamfStandin(token_lifetime=2.0).start()
    yield server
    server.stop()
    assert server.errors == [], server.errors  # every request fit the SDK's models / Jamf's reference


MiB = 1 << 20


def jamf_env(standin: JamfStandin, **extra) -> dict:
    return {"ODST_JAMF_URL": standin.url, "ODST_JAMF_CLIENT_ID": CLIENT_ID,
            "ODST_JAMF_CLIENT_SECRET": CLIENT_SECRET, "ODST_JAMF_CHECK_INTERVAL_S": "3600", **FAST_RETRY,
            **{f"ODST_JAMF_{k.upper()}": str(v) for k, v in extra.items()}}


def events_of(net_or_client, site, name: str) -> list[dict]:
    return net_or_client.get(site, f"/api/v1/events?name={name}&limit=1000")["events"]


def synced_of(net, name: str, blake3: str) -> list[dict]:
    return [e for e in events_of(net, "hq", name)
            if e["type"] == "JamfPackageSynced" and e["envelope"]["event"]["blake3"] == blake3]


def test_three_sites_dp_records_package_record_after_prod_everywhere_replace_and_drift(tmp_path, standin, receiver):
    """Issue 11's story: DP records for three sites; a package uploaded at a branch in stage
    test and promoted gets its record once every prod site serves it; replaced while a Mac per
    site downloads all along, no Mac sees a 404/5xx or a mixed body and the record's hash moves
    once, after the last site swapped (a token dying between finding and writing the record is
    renewed); an edited hash is drift, reported by ``odst jamf check`` and a webhook."""
    net = Network(tmp_path / "net", title="jamf", admin_token=ADMIN_TOKEN)
    try:
        # c replicates prod only: it fetches the package when it is promoted, and the record waits for it
        net.hub("hq", ["b", "c"], hq={"env": jamf_env(standin)}, c={"accept": ["prod"]})
        net.start()
        net.register("hq", "b")
        net.register("hq", "c")
        with net["hq"].client() as c:
            subscribe(c, receiver.url("/drift"), ["JamfDriftDetected"])

        with net.step("odst jamf check-connection and register-dp --all-sites (HTTP sites: Classic API)"):
            env = {"ODST_SERVER": net["hq"].url, "ODST_TOKEN": ADMIN_TOKEN}
            out = run_odst("jamf", "check-connection", env=env)
            assert out.returncode == 0 and "Jamf Pro 11.20.0" in out.stdout, out.stderr
            out = run_odst("jamf", "register-dp", "--all-sites", "--failover", "hq", env=env)
            assert out.returncode == 0, out.stderr
            assert sorted(standin.classic_dps) == ["ODST b", "ODST c", "ODST hq"]
            for name in ("hq", "b", "c"):
                dp = standin.classic_dps[f"ODST {name}"]
                assert dp["http_url"] == f"{net[name].url}/CasperShare" and dp["protocol"] == "http"
                assert dp["failover_point"] == ("" if name == "hq" else "ODST hq")
            again = net.request("hq", "POST", "/api/v1/jamf/distribution-points", json={})
            assert [d["action"] for d in again["distribution_points"]] == ["updated"]  # found by name

        old = random.Random(11).randbytes(3 * MiB + 5)
        old_sha512 = hashlib.sha512(old).hexdigest()
        v1 = net.upload("b", "Tool.pkg", data=old, stage="test")
        net.wait_available("Tool.pkg", ["hq", "b"])
        assert standin.by_file("Tool.pkg") is None  # stage test: not Jamf's business
        standin.revoke_tokens()  # every token is void now; those issued earlier have expired too (2 s)
        issued = standin.tokens_issued
        net.stage("hq", "Tool.pkg", "prod")

        with net.step("the record appears with the SHA-512, after every prod site serves the content"):
            net.wait_until(lambda: standin.by_file("Tool.pkg"), 60, "the Jamf Pro record of Tool.pkg")
            record = standin.by_file("Tool.pkg")
            assert (record["hashType"], record["hashValue"], record["size"]) == ("SHA_512", old_sha512, str(len(old)))
            # the record is written before its event is appended
            net.wait_until(lambda: synced_of(net, "Tool.pkg", v1["blake3"]), 30, "the JamfPackageSynced event")
            history = events_of(net, "hq", "Tool.pkg")
            synced = [e for e in history if e["type"] == "JamfPackageSynced"]
            assert synced and synced[0]["envelope"]["event"]["action"] == "created" and synced[0]["envelope"]["event"]["record_id"] == record["id"]
            served = {e["origin"]: e["ts"] for e in history if e["type"] in ("PackageAvailable", "PackageUploaded")}
            assert set(served) == {net[n].id for n in ("hq", "b", "c")}
            assert synced[0]["ts"] >= served[net["c"].id]  # c fetched it only after the promotion
            assert standin.tokens_issued > issued  # a new token, and no write failed for the old one
            assert all(e["envelope"]["event"]["result"] == "ok" for e in synced)
            assert net.get("hq", "/api/v1/jamf/packages/Tool.pkg")["state"] == "in_sync"

        new = random.Random(12).randbytes(4 * MiB + 9)
        new_sha512 = hashlib.sha512(new).hexdigest()
        versions = {f'"{v1["blake3"]}"': hashlib.sha256(old).hexdigest()}
        stop = threading.Event()
        macs = [Mac(n, net[n].url, "Tool.pkg", stop, deadline_s=90) for n in ("hq", "b", "c")]
        try:
            with net.step("replace Tool.pkg at c while a Mac per site downloads it over and over"):
                for m in macs:
                    m.start()
                net.wait_until(lambda: all(m.first(next(iter(versions))) for m in macs), 30, "every Mac to get v1")
                # Jamf Pro refuses the token right after the sync found the record, before it writes it.
                # Tokens live 60 s from here (the 2 s ones are void): on a loaded machine a 2 s token
                # could age out between the lookup and the write, and ODST would renew it unasked.
                standin.token_lifetime = 60.0
                standin.revoke_tokens()
                standin.revoke_after("GET", "/api/v1/packages")
                revoked_from = len(standin.log)
                v2 = net.upload("c", "Tool.pkg", data=new, replace=True)
                assert v2["generation"] == 1
                new_tag = f'"{v2["blake3"]}"'
                versions[new_tag] = hashlib.sha256(new).hexdigest()
                net.wait_until(lambda: standin.by_file("Tool.pkg")["hashValue"] == new_sha512, 60,
                               "the record's hash to move to the new version")
                moved_at = max(t for t, f, h in standin.hash_history if f == "Tool.pkg" and h == new_sha512)
                net.wait_until(lambda: all(m.first(new_tag) for m in macs), 30, "every Mac to get the new version")
        finally:
            stop.set()
            for m in macs:
                m.join(40)

        with net.step("no Mac saw a 404/5xx or a mixed body; the hash moved once, after the last swap"):
            for m in macs:
                assert not m.is_alive()
                assert m.problems(versions) == [], m.problems(versions)
                # every site had swapped when Jamf Pro's hash moved: no download begun after it got the old bytes
                late = [x for x in m.seen if x.etag != new_tag and x.started > moved_at]
                assert late == [], f"{m.label} served the old version after the record moved: {late[:3]}"
                assert m.first(new_tag).t > 0 and any(x.etag != new_tag for x in m.seen)
            assert standin.hashes_of("Tool.pkg") == [old_sha512, new_sha512]
            net.wait_until(lambda: synced_of(net, "Tool.pkg", v2["blake3"]), 30, "the replacement's JamfPackageSynced")
            history = events_of(net, "hq", "Tool.pkg")
            swaps = {e["origin"]: e["ts"] for e in history if e["type"] in ("PackageAvailable", "PackageReplaced")
                     and e["envelope"]["event"]["blake3"] == v2["blake3"]}
            assert set(swaps) == {net[n].id for n in ("hq", "b", "c")}
            moved = [e for e in history if e["type"] == "JamfPackageSynced"
                     and e["envelope"]["event"]["blake3"] == v2["blake3"]]
            assert [e["envelope"]["event"]["action"] for e in moved] == ["updated"]
            assert moved[0]["envelope"]["event"]["result"] == "ok" and moved[0]["ts"] >= max(swaps.values())
            # the token died mid-operation (right after a lookup; usually the sync's own, then its
            # PUT got the 401; a periodic check's lookup may take it first): a request got 401,
            # a new token was issued, and the write went through with it
            after = standin.log[revoked_from:]
            refused = [i for i, (_, _, status) in enumerate(after) if status == 401]
            assert refused, after
            assert any(m == "PUT" and p == f"/api/v1/packages/{record['id']}" and status == 200
                       for m, p, status in after[refused[0]:]), after
            assert net.get("hq", "/api/v1/jamf/packages/Tool.pkg")["state"] == "in_sync"

        with net.step("a hash edited in Jamf Pro is drift: odst jamf check and a webhook report it"):
            standin.edit_hash("Tool.pkg", "0" * 128)
            out = run_odst("jamf", "check", env=env)
            assert out.returncode == 1 and "hash_differs" in out.stdout and "Tool.pkg" in out.stdout, out.stdout
            net.wait_until(lambda: receiver.got("/drift", ok=True), 30, "the drift webhook")
            body = json.loads(receiver.got("/drift")[0]["body"])
            assert body["type"] == "JamfDriftDetected" and "Tool.pkg" in json.dumps(body)
            assert new_sha512 in json.dumps(body)  # expected: the new version's hash
            # ODST owns the record's hash: the sync writes it back, and the state says so
            net.wait_until(lambda: standin.by_file("Tool.pkg")["hashValue"] == new_sha512, 30, "the hash written back")
            net.wait_until(lambda: net.get("hq", "/api/v1/jamf/packages/Tool.pkg")["state"] == "in_sync", 30,
                           "in sync again")

        with net.step("deleting in ODST leaves the Jamf record (deletes not allowed)"):
            net.delete("hq", "Tool.pkg")
            applied = net.request("hq", "POST", "/api/v1/jamf/sync", json={"dry_run": False})
            assert applied["actions"] == [] and standin.by_file("Tool.pkg") is not None
            out = run_odst("jamf", "check", env=env)
            assert "no_file" in out.stdout and out.returncode == 1
        assert standin.tokens_issued >= 2
    finally:
        net.close()


def test_https_dp_via_jamf_pro_api_classic_on_404_and_dry_run(make_site, standin):
    site = make_site(env=jamf_env(standin, dry_run="true", hash_type="SHA3_512"),
                     extra_args=["--public-url", "https://dp.example.org:8443/odst"]).start()
    with site.client() as c:
        r = c.post("/api/v1/jamf/distribution-points", json={})
        assert r.status_code == 200, r.text
        [dp] = r.json()["distribution_points"]
        assert dp["api"] == "pro" and dp["url"] == "https://dp.example.org:8443/odst/CasperShare"
        [body] = standin.dps.values()
        assert (body["serverName"], body["httpsPort"], body["httpsContext"], body["fileSharingConnectionType"]) \
            == ("dp.example.org", 8443, "odst/CasperShare", "NONE")
        standin.dp_api_404 = True  # a Jamf Pro before 11.16
        r = c.post("/api/v1/jamf/distribution-points", json={})
        assert r.json()["distribution_points"][0]["api"] == "classic"
        assert standin.classic_dps[dp["name"]]["protocol"] == "https"

        data = os.urandom(200_000)
        assert upload_bytes(c, "Dry.pkg", data, params={"stage": "prod"}).status_code == 201
        # dry run: the plan is recorded in the package's history, Jamf Pro is not touched
        def planned():
            return [e for e in c.get("/api/v1/events", params={"name": "Dry.pkg"}).json()["events"]
                    if e["type"] == "JamfPackageSynced"]
        wait_until(planned, 30, what="the dry run's event")
        event = planned()[0]["envelope"]["event"]
        assert event["dry_run"] and event["action"] == "would create"
        assert event["hash_type"] == "SHA3_512" and event["hash_value"] == hashlib.sha3_512(data).hexdigest()
        # computed in the upload's single pass and kept beside the site, not in any event
        b3 = c.get("/api/v1/packages/Dry.pkg").json()["blake3"]
        assert Digests(digests_path(site.data)).get(b3, "SHA3_512") == hashlib.sha3_512(data).hexdigest()
        assert standin.packages == {}
        assert c.get("/api/v1/jamf/packages/Dry.pkg").json()["state"] == "no_record"
        out = run_odst("jamf", "sync", env={"ODST_SERVER": site.url, "ODST_TOKEN": ADMIN_TOKEN})
        assert out.returncode == 0 and "would create" in out.stdout and "Dry.pkg" in out.stdout, out.stdout
        assert standin.packages == {}
        # an operator may read the state but not change Jamf Pro
        tok = c.post("/api/v1/tokens", json={"name": "op", "role": "operator"}).json()["token"]
        assert c.post("/api/v1/jamf/check", headers={"Authorization": f"Bearer {tok}"}).status_code == 403
        assert c.get("/api/v1/jamf", headers={"Authorization": f"Bearer {tok}"}).json()["hash_type"] == "SHA3_512"
        assert CLIENT_SECRET not in c.get("/api/v1/jamf").text
        assert CLIENT_SECRET not in json.dumps(c.get("/api/v1/events", params={"limit": 1000}).json())


def test_ui_shows_the_connection_registers_dps_and_the_package_state(make_site, standin, page):
    from playwright.sync_api import expect

    from tests.system.test_ui import ADMIN_PASSWORD
    site = make_site(env={**jamf_env(standin), "ODST_ADMIN_PASSWORD": ADMIN_PASSWORD, "ODST_SITE_NAME": "HQ"}).start()
    with site.client() as c:
        assert upload_bytes(c, "Ui.pkg", os.urandom(50_000), params={"stage": "prod"}).status_code == 201
    wait_until(lambda: standin.by_file("Ui.pkg"), 30, what="the record of Ui.pkg")
    sign_in(page, site, "admin", ADMIN_PASSWORD)

    page.goto(site.url + "/#/packages/Ui.pkg")
    expect(page.locator("[data-jamf]")).to_have_text(re.compile("in sync"))
    expect(page.get_by_text(re.compile(r"Jamf Pro record of Ui\.pkg \(id \d+\): created")).first).to_be_visible()

    page.goto(site.url + "/#/settings")
    card = page.locator("#jamf-card")
    card.get_by_role("button", name="Check the Jamf Pro connection").click()
    expect(card).to_contain_text("Connected to Jamf Pro 11.20.0")

    page.goto(site.url + "/#/network")
    page.get_by_role("button", name="Register in Jamf Pro").click()
    expect(page.get_by_text("ODST HQ: created (classic API)")).to_be_visible()
    assert "ODST HQ" in standin.classic_dps


def test_periodic_check_finds_a_missing_record_and_allowed_deletes_remove_only_odsts(make_site, standin):
    site = make_site(env=jamf_env(standin, check_interval_s=1, allow_deletes="true", hash_type="MD5")).start()
    with site.client() as c:
        data = os.urandom(300_000)
        assert upload_bytes(c, "Gone.pkg", data, params={"stage": "prod"}).status_code == 201
        wait_until(lambda: standin.by_file("Gone.pkg"), 30, what="the record of Gone.pkg")
        record = standin.by_file("Gone.pkg")
        assert record["hashType"] == "MD5" and record["hashValue"] == record["md5"] == hashlib.md5(data).hexdigest()
        standin.packages.pop(record["id"])  # someone deletes the record in Jamf Pro

        def drift():
            return [e["envelope"]["event"] for e in c.get("/api/v1/events", params={"name": "Gone.pkg"}).json()["events"]
                    if e["type"] == "JamfDriftDetected"]
        wait_until(drift, 30, what="the periodic check to notice the missing record")
        assert drift()[0]["kind"] == "missing"
        wait_until(lambda: standin.by_file("Gone.pkg"), 30, what="the record written again")

        # a record ODST did not create, for a file ODST also serves: never deleted
        assert upload_bytes(c, "Theirs.pkg", b"x" * 1000, params={"stage": "test"}).status_code == 201
        standin.packages["900"] = {**standin.by_file("Gone.pkg"), "id": "900", "fileName": "Theirs.pkg",
                                   "packageName": "Theirs", "hashValue": hashlib.md5(b"x" * 1000).hexdigest()}
        c.patch("/api/v1/packages/Theirs.pkg", json={"stage": "prod"})
        wait_until(lambda: c.get("/api/v1/jamf/packages/Theirs.pkg").json()["state"] == "in_sync", 30,
                   what="Theirs.pkg in sync (found by fileName, updated)")
        assert c.delete("/api/v1/packages/Gone.pkg").status_code == 200
        assert c.delete("/api/v1/packages/Theirs.pkg").status_code == 200
        wait_until(lambda: standin.by_file("Gone.pkg") is None, 30, what="ODST's own record deleted")
        assert standin.by_file("Theirs.pkg") is not None  # not ODST's: kept
    r = run_odst("audit", "--data", str(site.data))  # the Jamf events verify, and a rebuild equals the live model
    assert r.returncode == 0, r.stdout + r.stderr


def test_jamf_refusing_the_token_during_an_upload_and_sync_does_not_fail_it(make_site):
    """Bounded version of the issue's 2 GB case (bench/jamf.py runs the full size): the site holds
    a token that is fresh by its own clock when Jamf Pro stops taking it, half-way through the
    upload; the record is still written, with one renewal and no failed write."""
    server = JamfStandin(token_lifetime=60.0).start()
    try:
        site = make_site(env=jamf_env(server)).start()
        with site.client() as c:
            assert c.post("/api/v1/jamf/check-connection").status_code == 200  # the site now holds a token
            assert server.tokens_issued == 1
            half = os.urandom(8 << 20)

            def body():
                yield half
                server.revoke_tokens()  # Jamf Pro restarts mid-upload: the site's token is void
                yield half

            r = c.put("/api/v1/packages/Long.pkg", content=body(), params={"stage": "prod"},
                      headers={"Content-Length": str(2 * len(half))})
            assert r.status_code == 201, r.text
            wait_until(lambda: server.by_file("Long.pkg"), 30, what="the record of Long.pkg")
            assert server.by_file("Long.pkg")["hashValue"] == hashlib.sha512(half + half).hexdigest()
            assert server.tokens_issued == 2  # renewed once, on the 401
            assert ("GET", "/api/v1/packages", 401) in server.log
            synced = [e["envelope"]["event"] for e in c.get("/api/v1/events", params={"name": "Long.pkg"}).json()["events"]
                      if e["type"] == "JamfPackageSynced"]
            assert [e["result"] for e in synced] == ["ok"]
    finally:
        server.stop()
    assert server.errors == []


def test_a_jamf_pro_before_11_5_gets_classic_package_records_created_replaced_checked_deleted(make_site, standin):
    """/api/v1/packages answers 404 (Jamf Pro < 11.5): the records go through the Classic
    /JSSResource/packages (XML checked against jamf-pro-sdk's ClassicPackage), found by name,
    then by reading every record when an admin named it otherwise."""
    standin.packages_api_404 = True
    site = make_site(env=jamf_env(standin, allow_deletes="true")).start()
    with site.client() as c:
        v1, v2 = os.urandom(150_000), os.urandom(170_000)
        # an admin's record for Other.pkg under another display name: found by its filename
        standin.packages["50"] = {"id": "50", "packageName": "Other (admin)", "fileName": "Other.pkg",
                                  "hashType": "MD5", "hashValue": "0" * 32, "notes": "the admin's"}
        assert upload_bytes(c, "Classic.pkg", v1, params={"stage": "prod"}).status_code == 201
        assert upload_bytes(c, "Other.pkg", v2, params={"stage": "prod"}).status_code == 201
        wait_until(lambda: (standin.by_file("Classic.pkg") or {}).get("hashValue") == hashlib.sha512(v1).hexdigest(),
                   30, what="the Classic record of Classic.pkg")
        wait_until(lambda: standin.packages["50"]["hashValue"] == hashlib.sha512(v2).hexdigest(), 30,
                   what="the admin's Classic record of Other.pkg updated")
        other = standin.packages["50"]
        assert (other["packageName"], other["hashType"], other["notes"]) == ("Other (admin)", "SHA_512", "the admin's")
        assert ("POST", "/JSSResource/packages/id/0", 201) in standin.log
        assert not any(path == "/api/v1/packages" and status != 404 for _, path, status in standin.log)

        new = os.urandom(160_000)
        r = c.put("/api/v1/packages/Classic.pkg", content=new, params={"replace": "true"})
        assert r.status_code == 201, r.text
        wait_until(lambda: standin.by_file("Classic.pkg")["hashValue"] == hashlib.sha512(new).hexdigest(), 30,
                   what="the replacement's hash in the Classic record")
        assert standin.hashes_of("Classic.pkg") == [hashlib.sha512(v1).hexdigest(), hashlib.sha512(new).hexdigest()]

        standin.edit_hash("Classic.pkg", "f" * 128)
        report = c.post("/api/v1/jamf/check").json()
        assert {p["name"]: p["state"] for p in report["packages"]}["Classic.pkg"] == "hash_differs", report

        assert c.delete("/api/v1/packages/Classic.pkg").status_code == 200
        wait_until(lambda: standin.by_file("Classic.pkg") is None, 30, what="ODST's Classic record deleted")
        assert ("DELETE", "/JSSResource/packages/id/1", 200) in standin.log
        assert c.delete("/api/v1/packages/Other.pkg").status_code == 200
        assert c.post("/api/v1/jamf/sync", json={"dry_run": False}).status_code == 200
        assert standin.by_file("Other.pkg") is not None  # not ODST's: kept


def test_package_page_shows_the_cutover_per_site_beside_jamf_pros_previous_version(tmp_path, standin, page):
    """While a site has not swapped to a replacement (here: it is stopped), the record keeps the
    old hash and the package page says so beside the per-site cutover; once it swaps, the hash
    moves and the page says in sync."""
    from playwright.sync_api import expect

    from tests.system.test_ui import ADMIN_PASSWORD, sign_in
    net = Network(tmp_path / "net", title="jamf page", admin_token=ADMIN_TOKEN)
    try:
        net.hub("hq", ["b"], hq={"env": {**jamf_env(standin), "ODST_ADMIN_PASSWORD": ADMIN_PASSWORD}})
        net.start()
        net.register("hq", "b")
        old, new = os.urandom(300_000), os.urandom(200_000)
        net.upload("hq", "Page.pkg", data=old, stage="prod")
        net.wait_until(lambda: net.get("hq", "/api/v1/jamf/packages/Page.pkg")["state"] == "in_sync", 60,
                       "the record of Page.pkg, and its event")
        net.stop("b")
        net.upload("hq", "Page.pkg", data=new, replace=True)
        state = net.get("hq", "/api/v1/jamf/packages/Page.pkg")
        assert state["state"] == "previous_version", state
        assert standin.hashes_of("Page.pkg") == [hashlib.sha512(old).hexdigest()]

        sign_in(page, net["hq"], "admin", ADMIN_PASSWORD)
        page.goto(net["hq"].url + "/#/packages/Page.pkg")
        expect(page.locator("[data-jamf]")).to_have_text(re.compile("previous version until every site swaps"))
        expect(page.get_by_role("row", name=re.compile(r"^hq")).get_by_text("this version")).to_be_visible()
        expect(page.get_by_role("row", name=re.compile(r"^b\b")).get_by_text("previous version")).to_be_visible()
        expect(page.get_by_text(re.compile("Replacement in progress: one site serves the previous version"))).to_be_visible()

        net.start("b")
        net.wait_until(lambda: standin.by_file("Page.pkg")["hashValue"] == hashlib.sha512(new).hexdigest(), 60,
                       "the hash to move once b swapped")
        net.wait_until(lambda: net.get("hq", "/api/v1/jamf/packages/Page.pkg")["state"] == "in_sync", 30,
                       "in sync (the event follows the write)")
        page.reload()
        expect(page.locator("[data-jamf]")).to_have_text(re.compile("in sync"))
        page.goto("about:blank")  # end the page's event stream before the sites stop
    finally:
        net.close()
