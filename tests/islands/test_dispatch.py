"""The dispatcher's API: submit a job without naming an Island, follow it, cancel it."""

import json
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from islands.models import Attempt, DispatcherKey, Island, Job
from karma.models import KarmaEvent
from tests.islands.conftest import T0, beat, make_island, post_json

JOBS = "/api/v1/jobs"
POLL = "/api/v1/islands/jobs/poll"
ROOM: dict[str, Any] = {"performance_estimates": {"max_concurrent_containers": 8}}


@pytest.fixture
def key(db) -> str:
    return DispatcherKey.objects.issue("test dispatcher")[1]


@pytest.fixture
def online(alice) -> Island:
    """Alice's Island, online now with room for eight jobs."""
    island = make_island(alice)
    beat(island, timezone.now(), **ROOM)
    island.refresh_from_db()
    return island


def body(**fields: Any) -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "workload": "llm-chat",
        "runtime": "container",
        "input": {"prompt": "Hello"},
        "budget": "2.5",
        "lease_seconds": 300,
        **fields,
    }


def submit(client, key, **fields: Any) -> Any:
    return post_json(client, JOBS, body(**fields), key)


def get(client, key, job_id: str) -> Any:
    return client.get(f"{JOBS}/{job_id}", headers={"Authorization": f"Bearer {key}"})


# --- Submitting ---------------------------------------------------------------------------


def test_a_job_without_an_island_is_placed_and_answered_with_its_placement(client, key, online):
    with time_machine.travel(T0, tick=False):
        beat(online, T0, **ROOM)
        response = submit(client, key)
    assert response.status_code == 201, response.json()
    assert response.json() == {
        "success": True,
        "created": True,
        "job": {
            "job_id": "job-1",
            "island_id": str(online.pk),
            "host_id": online.host_id,
            "workload": "llm-chat",
            "runtime": "container",
            "credits": "1.0000",  # the Island names no price: DEFAULT_ASK
            "budget": "2.5000",
            "state": "assigned",
            "attempt": 1,
            "assigned_at": "2026-03-01T12:00:00+00:00",
            "lease_expires_at": "2026-03-01T12:05:00+00:00",
        },
    }
    job = Job.objects.get()
    assert (job.island, job.input, job.fixed_credits, job.submitted_by.name) == (
        online,
        {"prompt": "Hello"},
        False,
        "test dispatcher",
    )


def test_the_island_polls_the_job_with_its_input_runtime_and_artefacts(client, key, online):
    token = online.issue_token()
    artefacts = {"container_image": "registry.example.com/llm-chat:latest", "image_digest": "sha256:ab12"}
    assert submit(client, key, sandbox_tier="standard", **artefacts).status_code == 201
    [polled] = post_json(client, POLL, {}, token).json()["jobs"]
    assert polled == {
        "job_id": "job-1",
        "workload_id": "llm-chat",
        "input": {"prompt": "Hello"},
        "lease_expires": polled["lease_expires"],
        "runtime_type": "container",
        "container_image": "registry.example.com/llm-chat:latest",
        "image_digest": "sha256:ab12",
        "sandbox_tier": "standard",
        "credits": "1.0000",
    }


def test_a_retry_of_the_same_body_answers_the_same_placement(client, key, online, bob):
    first = submit(client, key).json()["job"]
    # Another Island appears; a retry is not placed again.
    beat(make_island(bob, "bobs-host-00001"), timezone.now(), **ROOM)
    again = submit(client, key)
    assert (again.status_code, again.json()["created"]) == (200, False)
    assert again.json()["job"] == first
    assert (Job.objects.count(), Attempt.objects.count()) == (1, 1)
    assert Island.objects.get(pk=online.pk).jobs_running == 1


@pytest.mark.parametrize(
    "change",
    [
        {"budget": "3"},
        {"input": {"prompt": "Bye"}},
        {"workload": "sdxl"},
        {"lease_seconds": 60},
        {"runtime": "wasm", "wasm_url": "https://x/y.wasm"},
    ],
)
def test_the_same_job_id_with_another_body_is_a_conflict(client, key, online, change):
    assert submit(client, key).status_code == 201
    response = submit(client, key, **change)
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "job_id job-1 is already recorded, with another body",
    }
    assert Job.objects.count() == 1


def test_when_no_island_may_take_it_the_answer_says_why_and_nothing_is_written(client, key, alice):
    make_island(alice, "offline-host-01")  # never beat
    suspended = make_island(alice, "suspended-0001", suspended_at=T0)
    beat(suspended, timezone.now())
    response = submit(client, key)
    assert response.status_code == 503
    assert response["Retry-After"] == "15"
    assert response.json() == {
        "success": False,
        "error": "no eligible island",
        "reasons": {
            "suspended": 1,
            "maintenance": 0,
            "offline": 1,
            "runtime": 0,
            "resting": 0,
            "vram": 0,
            "region": 0,
            "platform": 0,
            "subject": 0,
            "price": 0,
            "karma": 0,
            "capacity": 0,
        },
    }
    assert not Job.objects.exists() and not Attempt.objects.exists()
    # The same job, submitted again once an Island can take it, is placed.
    island = make_island(alice, "online-host-01")
    beat(island, timezone.now())
    assert submit(client, key).status_code == 201


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"budget": None}, 400, "`budget` is required"),
        ({"credits": "2"}, 400, "`credits` names an amount only with `island_id`"),
        ({"runtime": "onnx"}, 400, "a onnx job needs `onnx_model_url`"),
        ({"runtime": "wasm"}, 400, "a wasm job needs `wasm_url`"),
        ({"runtime": "llmcpp"}, 400, "a llmcpp job needs `model_url`"),
        ({"runtime": "diffusers"}, 400, "a diffusers job needs `model_url`"),
        ({"runtime": "coreml"}, 400, "a coreml job needs `model_url`"),
        ({"runtime": "tensorrt"}, 400, "invalid runtime"),
        ({"requirements": {"region": "auto"}}, 400, 'name a region, not "auto"'),
        ({"requirements": {"regoin": "eu"}}, 400, "invalid requirements"),
        ({"requirements": {"platform": "windows"}}, 400, "invalid requirements.platform"),
        ({"requirements": {"min_vram_mb": -1}}, 400, "invalid requirements.min_vram_mb"),
        ({"budget": "1.00001"}, 400, "invalid budget: at most 4 decimal places"),
        ({"budget": "-1"}, 400, "invalid budget"),
        ({"budget": "2_5"}, 400, "invalid budget"),
        ({"workload": "llm chat"}, 400, "invalid workload"),
        ({"sandbox_tier": "root"}, 400, "invalid sandbox_tier"),
        ({"model_temperature": "hot"}, 400, "invalid model_temperature"),
        ({"input": {"text": "x" * (64 * 1024)}}, 413, "invalid input: at most 65536 bytes"),
        ({"lease_seconds": 0}, 400, "invalid lease_seconds"),
    ],
)
def test_a_job_the_agent_could_not_run_or_that_is_malformed_is_refused_and_nothing_written(
    client, key, online, fields, status, message
):
    payload = {name: value for name, value in body(**fields).items() if value is not None}
    response = post_json(client, JOBS, payload, key)
    assert response.status_code == status, response.json()
    assert response.json()["success"] is False
    assert message in response.json()["error"]
    assert not Job.objects.exists()
    assert Island.objects.get(pk=online.pk).jobs_running == 0


def test_a_body_past_128_kib_is_refused_before_it_is_read(client, key, online):
    response = post_json(client, JOBS, json.dumps(body(input={"x": "y" * (130 * 1024)})), key)
    assert response.status_code == 413
    assert response.json()["error"] == "body too large: at most 131072 bytes"


def test_submitting_needs_a_dispatcher_key(client, online):
    token = online.issue_token()
    for authorization in (None, "dsp_wrong", token):
        assert post_json(client, JOBS, body(), authorization).status_code == 401
    assert not Job.objects.exists()


# --- Naming the Island ------------------------------------------------------------------------


def test_a_named_island_that_may_not_take_it_answers_409_with_the_rule(client, key, online):
    response = submit(
        client, key, island_id=str(online.pk), runtime="onnx", onnx_model_url="https://m/x.onnx"
    )
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "this Island cannot take the job: it does not run this job's runtime",
        "rule": "runtime",
    }
    assert submit(client, key, island_id="00000000-0000-4000-8000-000000000000").status_code == 404
    assert not Job.objects.exists()


def test_a_named_island_is_paid_its_ask_with_a_budget_or_the_amount_named_in_credits(client, key, online):
    Island.objects.filter(pk=online.pk).update(asking_prices={"llm-chat": "1.5"})
    job = submit(client, key, island_id=str(online.pk)).json()["job"]
    assert (job["credits"], job["budget"]) == ("1.5000", "2.5000")
    fixed = submit(client, key, job_id="job-2", island_id=str(online.pk), budget=None, credits="2")
    assert fixed.json()["job"]["credits"] == "2.0000"


# --- Following and cancelling -------------------------------------------------------------------


def test_the_dispatcher_follows_a_job_and_its_attempts(client, key, online):
    submit(client, key)
    response = get(client, key, "job-1")
    assert response.status_code == 200
    job = response.json()["job"]
    assert (job["state"], job["attempt"], job["island_id"]) == ("assigned", 1, str(online.pk))
    [attempt] = job["attempts"]
    assert (attempt["attempt"], attempt["island_id"], attempt["outcome"], attempt["credits"]) == (
        1,
        str(online.pk),
        None,
        "1.0000",
    )
    assert get(client, key, "no-such-job").status_code == 404
    assert get(client, key, "bad id\n").status_code == 404
    assert client.get(f"{JOBS}/job-1").status_code == 401
    assert post_json(client, f"{JOBS}/job-1", {}, key).status_code == 405


def test_a_cancel_withdraws_the_job_at_no_cost_to_its_island(client, key, online):
    token = online.issue_token()
    submit(client, key)
    post_json(client, "/api/v1/islands/jobs/job-1/status", {"state": "started"}, token)
    response = post_json(client, f"{JOBS}/job-1/cancel", {}, key)
    assert response.status_code == 200
    assert response.json()["job"]["state"] == "cancelled"
    assert response.json()["job"]["attempts"][0]["outcome"] == "withdrawn"
    online.refresh_from_db()
    assert (online.jobs_running, online.jobs_failed, online.jobs_completed, online.karma) == (
        0,
        0,
        0,
        Decimal(50),
    )
    assert not KarmaEvent.objects.exists()
    # The Island hears it in its poll, and its late report changes nothing.
    assert post_json(client, POLL, {}, token).json()["cancelled"] == ["job-1"]
    late = post_json(client, "/api/v1/islands/jobs/job-1/status", {"state": "succeeded"}, token)
    assert (late.status_code, late.json()["error"]) == (409, "job job-1 already ended as cancelled")
    # Cancelling a finished job is a conflict.
    again = post_json(client, f"{JOBS}/job-1/cancel", {}, key)
    assert (again.status_code, again.json()["error"]) == (409, "job job-1 already ended as cancelled")
    assert post_json(client, f"{JOBS}/nope/cancel", {}, key).status_code == 404
