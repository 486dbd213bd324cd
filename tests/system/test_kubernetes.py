"""deploy/kubernetes validates offline against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field fails), rendered by kustomize where kubectl is installed, and file by
file always; and the shape the guide promises holds (3 NATS nodes on PVCs, one projector,
RWX shared volumes, probes on /healthz, disruption budgets, leafnodes over TLS)."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.dist import CHECKOUT

BASE = CHECKOUT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest release the manifests promise to work on (README)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def test_every_manifest_file_validates_and_is_in_the_kustomization():
    listed = set(kustomization()["resources"])
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files, f"not listed: {files - listed}; missing: {listed - files}"
    for name in sorted(files):
        for doc in documents((BASE / name).read_text()):
            validate(doc)


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    """The kustomization rendered by ``kubectl kustomize`` (offline), else its files as they are."""
    if shutil.which("kubectl"):
        done = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        docs = documents(done.stdout)
        assert all(d["metadata"].get("namespace") == "odst" for d in docs if d["kind"] != "Namespace")
    else:
        docs = [d for name in kustomization()["resources"] for d in documents((BASE / name).read_text())]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_rendered_site_validates(rendered):
    for doc in rendered.values():
        validate(doc)


def test_nats_is_three_jetstream_nodes_on_their_own_volumes_with_tls_leafnodes(rendered):
    nats = rendered[("StatefulSet", "nats")]["spec"]
    assert nats["replicas"] == 3
    claim = nats["volumeClaimTemplates"][0]
    mounts = {m["name"]: m["mountPath"] for m in nats["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    conf = rendered[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    assert 'store_dir: "/data"' in conf and "sync_interval: always" in conf
    leaf = conf[conf.index("leafnodes {"):]
    assert "tls {" in leaf and "/etc/nats-certs/leafnodes/" in leaf
    secrets = {v["secret"]["secretName"] for v in nats["template"]["spec"]["volumes"] if "secret" in v}
    assert "nats-leafnodes-tls" in secrets


def test_one_projector_scaled_out_gateways_and_replicators_on_a_shared_rwx_volume(rendered):
    projector = rendered[("Deployment", "odst-projector")]["spec"]
    assert projector["replicas"] == 1 and projector["strategy"]["type"] == "Recreate"
    assert rendered[("Deployment", "odst-gateway")]["spec"]["replicas"] >= 2
    assert rendered[("Deployment", "odst-replicator")]["spec"]["replicas"] >= 2
    assert rendered[("PersistentVolumeClaim", "odst-data")]["spec"]["accessModes"] == ["ReadWriteMany"]
    for role in ("projector", "gateway", "replicator"):
        pod = rendered[("Deployment", f"odst-{role}")]["spec"]["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert "odst-data" in claims, role
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
        assert pod["containers"][0]["args"][0] == role


def test_gateways_are_probed_on_healthz_and_every_scaled_part_has_a_disruption_budget(rendered):
    gateway = rendered[("Deployment", "odst-gateway")]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] == "/healthz", probe
    budgets = [d for (kind, _), d in rendered.items() if kind == "PodDisruptionBudget"]
    covered = {tuple(sorted(b["spec"]["selector"]["matchLabels"].items())) for b in budgets}
    for name in ("nats", "odst-gateway", "odst-replicator"):
        kind = "StatefulSet" if name == "nats" else "Deployment"
        labels = rendered[(kind, name)]["spec"]["selector"]["matchLabels"]
        assert tuple(sorted(labels.items())) in covered, name


def test_the_commands_in_the_manifests_parse_with_the_cli(rendered):
    from odst.cli import build_parser
    parser = build_parser()
    for (kind, name), doc in rendered.items():
        if kind in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("odst"):
                    parser.parse_args(c["args"])  # exits (SystemExit) on an unknown flag
