"""Web UI upload benchmark: a package uploaded through the browser (headless Chromium, the
UI's XMLHttpRequest PUT with progress) against the same file PUT with curl, same server, same
run. Prints both times and the ratio; the UI should cost little over curl.

    ./run bench-ui [--size-mb 2000] [--repeats 2]

Needs Debian's chromium (./run test installs it) and curl. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import free_port, median, ratio  # noqa: E402
from harness.site import SiteProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "bench-password-123"
TOKEN = "bench-token-0123456789"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists() or not shutil.which("curl"):
        raise SystemExit(f"needs {CHROMIUM} and curl")
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="odst-bench-ui-"))
    port = free_port()
    src = work / "Bench.pkg"
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(args.size_mb):
            f.write(block[:-8] + i.to_bytes(8, "big"))
    size = src.stat().st_size
    server = SiteProcess(data=work / "data", port=port, token=TOKEN, log_path=work / "serve.log",
                         env={"ODST_ADMIN_PASSWORD": PASSWORD, "ODST_LOG_LEVEL": "warning"}, die_with_parent=True)
    url = server.url
    ui_times, curl_times = [], []
    try:
        server.start(90)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page()
            page.goto(url + "/")
            page.get_by_label("User name").fill("admin")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", level=1, name="Packages").wait_for()
            for i in range(args.repeats):
                for kind in ("ui", "curl"):
                    name = f"{kind}-{i}.pkg"
                    if kind == "ui":
                        page.goto(url + "/ui/#/upload")
                        page.locator("input[type=file]").set_input_files(str(src))
                        page.get_by_label("Name on the server").fill(name)
                        started = time.monotonic()
                        page.get_by_role("button", name="Upload", exact=True).click()
                        page.locator(".upload-panel .message.success").wait_for(timeout=600_000)
                        ui_times.append(time.monotonic() - started)
                    else:
                        started = time.monotonic()
                        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-T", str(src), "-H",
                                        f"Authorization: Bearer {TOKEN}", f"{url}/api/v1/packages/{name}"],
                                       check=True)
                        curl_times.append(time.monotonic() - started)
                    r = httpx.delete(f"{url}/api/v1/packages/{name}", headers=auth, timeout=60)
                    assert r.status_code == 200, r.text
            browser.close()
    finally:
        server.stop(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    ui, curl = median(ui_times), median(curl_times)
    mb = size / 1e6
    print(f"upload {mb:.0f} MB   web UI (Chromium XHR) {ui:.2f} s ({mb / ui:.0f} MB/s)   "
          f"curl -T {curl:.2f} s ({mb / curl:.0f} MB/s)   ratio UI/curl {ratio(ui, curl):.2f}x")
    print(f"  runs: ui {[round(t, 2) for t in ui_times]}  curl {[round(t, 2) for t in curl_times]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
