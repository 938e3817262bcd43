"""schemathesis, driven by /api/v1/openapi.json, against a live daphne: every answer is one it describes.

Each operation of the document is a test; schemathesis draws bodies, paths
and headers from its schemas (valid ones, and ones that break them) and
checks each answer: no server error, a documented status, content type and
headers, a body matching its schema (so every error has the documented
{"success": false, "error": ...} shape), schema-breaking input refused with
a 4xx, and no answer to a request without its credential. The Island token
and the dispatcher key are real ones, made in the test database that the
daphne serves. A fixed number of examples, drawn deterministically, so CI
tries the same requests every run.
"""

import json
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
import requests
import schemathesis
from django.contrib.auth.models import User
from hypothesis import HealthCheck, settings
from schemathesis import checks

from archipelag.openapi import document
from islands.models import DispatcherKey
from tests.conftest import LiveServer
from tests.islands.conftest import make_island

schema = schemathesis.openapi.from_dict(document())

# More for a longer run: SCHEMATHESIS_EXAMPLES=500 (docs/testing.md).
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))


@schemathesis.check
def no_server_fault(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx but the documented 503 (no Island may take the job, or a moment's outage; with
    Retry-After, which response_headers_conformance holds it to)."""
    documented = case.operation.definition.raw["responses"]
    status = response.status_code
    if status >= 500 and not (status == 503 and "503" in documented):
        raise AssertionError(f"{case.operation.label} answered {status}: {response.text[:500]}")


CHECKS = [
    no_server_fault,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
    checks.unsupported_method,
    checks.missing_required_header,
]


@dataclass
class LiveApi:
    url: str
    island_token: str
    dispatcher_key: str

    def headers_for(self, case: Any) -> dict[str, str]:
        security = case.operation.definition.raw.get("security") or []
        names = {name for requirement in security for name in requirement}
        if "islandToken" in names:
            return {"Authorization": f"Bearer {self.island_token}"}
        if "dispatcherKey" in names:
            return {"Authorization": f"Bearer {self.dispatcher_key}"}
        return {}


@pytest.fixture
def live_api(daphne_server: LiveServer) -> LiveApi:
    alice = User.objects.create_user("alice", password="wonderland-42")
    island = make_island(alice, "fuzzed-island-0001")
    token = island.issue_token()
    _, key = DispatcherKey.objects.issue("schemathesis")
    api = LiveApi(daphne_server.url, token, key)
    # An Island online that takes jobs, and a job placed on it, so that the
    # dispatcher's and the Island's operations meet something to answer about.
    heartbeat = {"performance_estimates": {"max_concurrent_containers": 64}}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert requests.post(
        f"{api.url}/api/v1/islands/heartbeat", json.dumps(heartbeat), headers=headers, timeout=10
    ).ok
    job = {"job_id": "j1", "workload": "llm-chat", "budget": str(Decimal(5)), "lease_seconds": 300}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    assert (
        requests.post(f"{api.url}/api/v1/jobs", json.dumps(job), headers=headers, timeout=10).status_code
        == 201
    )
    return api


def test_the_document_is_served_and_is_openapi_3_1(daphne_server: LiveServer) -> None:
    response = requests.get(f"{daphne_server.url}/api/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    served = response.json()
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"] == "3.1.0"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_one_the_document_describes(case: Any, live_api: LiveApi) -> None:
    case.call_and_validate(base_url=live_api.url, headers=live_api.headers_for(case), checks=CHECKS)
