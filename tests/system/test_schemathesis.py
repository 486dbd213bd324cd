"""The Admin API against its own OpenAPI document, by schemathesis (third-party): generated
valid and invalid requests to every documented operation of a live site, every check
(no 5xx, documented status codes, content types, response schemas, invalid input refused, ...).

Bounded: a few examples per operation, a few hundred requests in all. Left out, and why:
the SSE stream (never ends), webhooks (a created hook POSTs to the URL it was given: no
traffic may leave this machine), the directory check (connects to the configured LDAP URL).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from tests.conftest import ADMIN_TOKEN, SiteProcess, free_port  # noqa: E402

EXAMPLES = 6


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory):
    site = SiteProcess(data=tmp_path_factory.mktemp("fuzz") / "site", port=free_port()).start()
    yield site
    site.stop()


def test_the_api_does_what_its_schema_says(fuzzed_site):
    from hypothesis import given
    from schemathesis import GenerationMode

    api = (schemathesis.openapi.from_url(f"{fuzzed_site.url}/schema/openapi.json", timeout=10)
           .exclude(operation_id=["streamEvents", "createWebhook", "checkDirectory"]))
    failures: list[str] = []
    sent = 0
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal sent
                sent += 1
                case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=20)
            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide the next one's
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert sent > 200, f"only {sent} requests were sent"
    assert not failures, "\n\n".join(failures)
