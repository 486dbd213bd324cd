"""/api/v1/settings: what the UI shows, and the stages a site accepts chosen at run time."""

from __future__ import annotations

from tests.conftest import run_odst, wait_until, write_random
from tests.system.test_replication import available_at, pair, site_id, upload  # noqa: F401  (pair is a fixture)


def test_settings_show_the_effective_values_without_secrets(make_site):
    site = make_site(env={"ODST_DOWNLOAD_AUTH": "basic", "ODST_DOWNLOAD_USER": "mac",
                          "ODST_DOWNLOAD_PASSWORD": "dp-secret-value", "ODST_SMTP_HOST": "127.0.0.1",
                          "ODST_SMTP_PASSWORD": "smtp-secret-value", "ODST_ACCEPT_STAGES": "test,prod"}).start()
    with site.client() as c:
        r = c.get("/api/v1/settings")
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["download_auth"] == "basic" and s["context"] == "CasperShare" and s["smtp"]["configured"]
    assert s["accepted_stages"] == ["test", "prod"] and s["accepted_stages_source"] == {"from": "setting"}
    assert "secret-value" not in r.text


def test_a_site_changes_the_stages_it_accepts_and_replication_follows(pair, tmp_path):
    a, b = pair
    b_id = site_id(b)
    with b.client() as cb:
        # refused: unknown stage, none at all, the wrong role
        for body in ({"stages": ["qa"]}, {"stages": []}, {"stages": "prod"}, {}):
            r = cb.put("/api/v1/settings/accepted-stages", json=body)
            assert r.status_code == 400 and r.json()["detail"], r.text
        auditor = cb.post("/api/v1/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
        with b.client(token=auditor) as aud:
            assert aud.put("/api/v1/settings/accepted-stages", json={"stages": ["prod"]}).status_code == 403

        r = cb.put("/api/v1/settings/accepted-stages", json={"stages": ["prod", "prod"]})
        assert r.status_code == 200, r.text
        assert r.json()["accepted_stages"] == ["prod"]
        assert r.json()["accepted_stages_source"]["from"] == "event"
        assert r.json()["accepted_stages_source"]["updated_by"].startswith("token:")

    # A learns B's choice from B's mirrored log: B not holding a dev package is by choice
    with a.client() as ca:
        wait_until(lambda: {p["site"]: p["accepted_stages"] for p in ca.get("/api/v1/peers").json()["peers"]}
                   .get(b_id) == ["prod"], 30, what="B's accepted stages to reach A")
        assert ca.get("/api/v1/settings").json()["accepted_stages_source"]["from"] == "default"
    upload(a, "Beta.pkg", write_random(tmp_path / "beta", 300_000, seed=1), stage="dev")
    upload(a, "Release.pkg", write_random(tmp_path / "rel", 300_000, seed=2), stage="prod")
    wait_until(lambda: available_at(b, "Release.pkg", b_id), 60, what="the prod package at B")
    # B's replicator looked at both (same pass, same read model) and took only prod
    assert not available_at(b, "Beta.pkg", b_id)
    with b.client() as cb:
        # the dev package is never even queued; the prod one leaves the list once its own
        # PackageAvailable is folded (the replicator forgets what it no longer wants)
        assert all(t["name"] != "Beta.pkg" for t in cb.get("/api/v1/state").json()["transfers"])
        wait_until(lambda: cb.get("/api/v1/state").json()["transfers"] == [], 30,
                   what="B's finished pull to leave its transfer list")

        assert cb.put("/api/v1/settings/accepted-stages", json={"stages": ["dev", "prod"]}).status_code == 200
    wait_until(lambda: available_at(b, "Beta.pkg", b_id), 60, what="the dev package once B accepts dev")

    # The choice is in the log; a restart keeps it and the audit replays it.
    b.stop()
    r = run_odst("audit", "--data", str(b.data))
    assert r.returncode == 0, r.stdout + r.stderr
    b.start()
    with b.client() as cb:
        assert cb.get("/api/v1/settings").json()["accepted_stages"] == ["dev", "prod"]
