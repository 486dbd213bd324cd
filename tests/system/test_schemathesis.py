"""The Admin API against its own OpenAPI document, by schemathesis (third-party): generated
valid and invalid requests to every documented operation of a live site, every check
(no 5xx, documented status codes, content types, response schemas, invalid input refused,
valid input accepted, ...).

Bounded: a few examples per operation, a few hundred requests in all. Left out, and why:
the SSE stream (never ends), webhooks (a created hook POSTs to the URL it was given: no
traffic may leave this machine), the directory check (connects to the configured LDAP URL).

"A schema-valid request is accepted" (positive_data_acceptance) holds because the request
structs and parameters carry their limits (msgspec ``Meta``, Litestar ``Parameter``,
odst.gateway.constraints) and the document names what a site's settings decide. It is not
asked of the operations whose acceptance rests on something no schema can say (NOT_BY_SCHEMA: an
invitation another site signed, a sealed registration request, a password change by a signed-in
user, the bandwidth grammar of rates, networks and timetables); their other checks still run.
"""

from __future__ import annotations

import pytest

import schemathesis  # the test extras
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import ADMIN_TOKEN, SiteProcess, free_port

EXAMPLES = 4

NOT_BY_SCHEMA = {
    "joinPeer": "only an invitation another site made and signed is accepted (invite_invalid)",
    "peerRegister": "the body is a registration request sealed to this site's key",
    "changeOwnPassword": "a signed-in local user changes their own password; the test calls with an API token",
    # a rate ("20MB", "2MiB", "off") is a small grammar with a ceiling of 10^12 bytes/s after its
    # unit, a network is whatever Python's ipaddress reads (IPv6 included), a timetable window is
    # "DAYS HH:MM-HH:MM RATE": no pattern says them without refusing some that are valid
    "setDownloadCaps": "a rate's grammar and ceiling",
    "setLinkLimits": "rates and timetable windows",
    "setLocalNetworks": "networks as ipaddress reads them",
}
# A parameter's schema that generated invalid values can break (a bare string path parameter
# has none: hypothesis would search for seconds and give up).
CONSTRAINTS = {"pattern", "enum", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"}


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory):
    site = SiteProcess(data=tmp_path_factory.mktemp("fuzz") / "site", port=free_port()).start()
    yield site
    site.stop()


def _can_be_invalid(operation) -> bool:
    raw = operation.definition.raw
    if "requestBody" in raw:
        return True
    for param in raw.get("parameters", []):
        schema = param.get("schema", {})
        if param.get("in") != "path" or schema.get("type") != "string" or CONSTRAINTS & set(schema):
            return True
    return False


def test_the_api_does_what_its_schema_says(fuzzed_site):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    api = (schemathesis.openapi.from_url(f"{fuzzed_site.url}/schema/openapi.json", timeout=10)
           .exclude(operation_id=["streamEvents", "createWebhook", "checkDirectory"]))
    failures: list[str] = []
    sent = accepted = 0
    for result in api.get_all_operations():
        operation = result.ok()
        excluded = [positive_data_acceptance] if operation.definition.raw.get("operationId") in NOT_BY_SCHEMA else []
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _can_be_invalid(operation) else [])
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal sent, accepted
                sent += 1
                response = case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=20,
                                                  excluded_checks=excluded)
                accepted += mode is GenerationMode.POSITIVE and response.status_code < 400
            try:
                run()
            except Unsatisfiable:  # nothing to make invalid
                continue
            except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide the next one's
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    print(f"schemathesis: {sent} requests, {accepted} valid ones accepted")
    assert sent > 150, f"only {sent} requests were sent"
    assert accepted > 50, f"only {accepted} generated valid requests were accepted"
    assert not failures, "\n\n".join(failures)
