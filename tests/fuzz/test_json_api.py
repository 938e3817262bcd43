"""Every JSON endpoint against random, mutated and raw bodies, odd headers and methods.

For every example: no 5xx, a JSON object back, `"success": false` with a
non-empty `error` on every 4xx, nothing that looks like a traceback, and
nothing written to the database when the request is refused. When it is
accepted, exactly the rows the endpoint's documented effect names change.
"""

import copy
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from django.db import models
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from archipelag.secrets import hash_secret
from islands.models import (
    HEARTBEAT_FIELDS,
    LEDGER_FIELDS,
    Attempt,
    DrawClock,
    Island,
    Job,
    MaintenanceWindow,
    OutboxMessage,
    StatusChange,
)
from karma.models import KarmaEvent
from pairing.codes import ALPHABET, hash_code
from pairing.models import PHONE_FIELDS, MobilePairingSession, PairingCode
from tests.conftest import CAPABILITIES, HOST_ID
from tests.fuzz import strategies as fuzz
from tests.fuzz.conftest import (
    BOB_PHONE_HOST,
    EACH_EXAMPLE_ROLLS_BACK,
    PENDING_HOST,
    SUSPENDED_HOST,
    TableChanges,
    World,
    changes,
    client_view,
    describe,
    rolled_back,
    send,
    snapshot,
)
from tests.islands.conftest import AGENT_HEARTBEAT, MINIMAL_HEARTBEAT
from tests.pairing.conftest import IPHONE, PHONE_HOST_ID, PIXEL

pytestmark = pytest.mark.django_db

TOKEN_FIELDS = {"token_hash", "token_expires_at"}
# The formats docs/api.md states, written out here rather than imported, so
# that an accepted value the code's own pattern lets slip is caught.
HOST_ID_FORMAT = re.compile(r"[A-Za-z0-9._-]{8,64}")
JOB_ID_FORMAT = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PRICE_FORMAT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,8})?")
# "a decimal string or number": digits, at most one point. Python's Decimal()
# would also read "2_5" as 25, " 2.5 " and digits of other scripts.
CREDITS_FORMAT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class Number(str):
    """A JSON number in a decoded body, kept as its text."""


def documented(pattern: re.Pattern[str], value: Any) -> None:
    assert isinstance(value, str) and pattern.fullmatch(value), f"accepted {value!r}, not {pattern.pattern}"


@dataclass
class Exchange:
    """One request the fuzzer sent, what came back, and what it changed."""

    world: World
    path: str
    body: bytes
    authorization: str | None
    status: int
    payload: dict[str, Any]
    changes: dict[type[models.Model], TableChanges]

    def decoded_body(self) -> Any:
        # Only for accepted bodies, which are JSON, though a field the server
        # skips may hold a number of 5,000 digits: numbers stay text here.
        return json.loads(self.body, parse_int=Number, parse_float=Number)

    def calling_island(self) -> Island:
        token = (self.authorization or "").partition(" ")[2].strip()
        island = Island.objects.authenticate(token)
        assert island is not None, "an Island endpoint accepted a request without a valid token"
        return island

    def only(self, *allowed: type[models.Model]) -> None:
        unexpected = set(self.changes) - set(allowed)
        assert not unexpected, f"{self.status} to {self.path} also wrote {describe(self.changes)}"

    def nothing_written(self) -> None:
        assert not self.changes, f"{self.status} to {self.path} wrote {describe(self.changes)}"


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: Callable[[World], str]
    # Bodies the endpoint accepts (or refuses for a reason of state, not of shape).
    valid: Callable[[World], list[Any]]
    authorization: Callable[[World], str | None]
    accepted: Callable[[Exchange], None]

    def __repr__(self) -> str:
        return self.name


# --- What each endpoint may write when it accepts a request -------------------------


def pairing_accepted(x: Exchange) -> None:
    assert x.status == 201
    host_id = x.decoded_body()["host_id"]
    documented(HOST_ID_FORMAT, host_id)
    x.only(PairingCode)
    codes = x.changes[PairingCode]
    assert len(codes.added) == 1 and not codes.removed, describe(x.changes)
    row = codes.added[0]
    assert (row["host_id"], row["channel"], row["used_at"]) == (host_id, "http", None)
    assert len(x.payload["code"]) == 6 and set(x.payload["code"]) <= set(ALPHABET)
    assert row["code_hash"] == hash_code(x.payload["code"])
    assert row["device_secret_hash"] == hash_secret(x.payload["device_secret"])
    # The host's earlier codes are retired, and nothing else is touched.
    for pk, names in codes.changed.items():
        assert names == {"retired_at"}
        assert PairingCode.objects.get(pk=pk).host_id == host_id


def poll_accepted(x: Exchange) -> None:
    assert x.status == 200
    host_id = x.decoded_body()["host_id"]
    assert x.payload["status"] in {"pending", "paired", "expired"}
    x.only(PairingCode, Island)
    codes = x.changes[PairingCode]
    assert not codes.added and not codes.removed
    for pk, names in codes.changed.items():
        assert PairingCode.objects.get(pk=pk).host_id == host_id
        assert names <= {"last_polled_at", "token_issued_at"}
    if x.payload["status"] == "paired":
        island = Island.objects.get(token_hash=hash_secret(x.payload["token"]))
        assert (str(island.pk), island.host_id) == (x.payload["island_id"], host_id)
        assert x.changes[Island].changed == {island.pk: {"token_hash"}}
    else:
        assert Island not in x.changes


def mobile_pair_accepted(x: Exchange) -> None:
    assert x.status == 201
    body = x.decoded_body()
    documented(HOST_ID_FORMAT, body["host_id"])
    x.only(MobilePairingSession, Island)
    sessions = x.changes[MobilePairingSession]
    assert not sessions.added and not sessions.removed and len(sessions.changed) == 1
    [(session_pk, names)] = sessions.changed.items()
    assert names <= {"used_at", "redeemed_via", "redeemed_ip", "island_id"}
    session = MobilePairingSession.objects.get(pk=session_pk)
    island = Island.objects.get(token_hash=hash_secret(x.payload["token"]))
    assert (island.host_id, island.kind, island.owner_id) == (body["host_id"], "mobile", session.owner_id)
    assert session.island_id == island.pk
    islands = x.changes[Island]
    assert not islands.removed
    if islands.added:
        assert [row["id"] for row in islands.added] == [island.pk] and not islands.changed
    else:
        assert list(islands.changed) == [island.pk]
        assert islands.changed[island.pk] <= set(PHONE_FIELDS) | TOKEN_FIELDS


def heartbeat_accepted(x: Exchange) -> None:
    assert x.status == 200
    island = x.calling_island()
    x.only(Island, StatusChange)
    islands = x.changes[Island]
    assert not islands.added and not islands.removed and list(islands.changed) == [island.pk]
    assert islands.changed[island.pk] <= set(HEARTBEAT_FIELDS)
    assert island.last_heartbeat_at is not None
    body = x.decoded_body()
    if body.get("host_id") is not None:
        assert body["host_id"] == island.host_id
    for price in island.asking_prices.values():
        documented(PRICE_FORMAT, price)
    if StatusChange in x.changes:
        status_changes = x.changes[StatusChange]
        assert not status_changes.changed and not status_changes.removed
        assert {row["island_id"] for row in status_changes.added} == {island.pk}


def jobs_poll_accepted(x: Exchange) -> None:
    assert x.status == 200
    x.nothing_written()
    waiting = Job.objects.waiting_for(x.calling_island()).values_list("job_id", flat=True)
    assert [job["job_id"] for job in x.payload["jobs"]] == list(waiting)


def maintenance_accepted(x: Exchange) -> None:
    assert x.status == 200
    island = x.calling_island()
    x.only(Island, MaintenanceWindow)
    if Island in x.changes:
        assert x.changes[Island].changed[island.pk] <= {"maintenance_until"}
    until = x.payload["maintenance_until"]
    assert (until is None) == (island.maintenance_until is None)
    if until is not None:
        documented(UTC_TIME, until)


UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _in_hours(hours: float) -> str:
    return (timezone.now() + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def job_status_accepted(x: Exchange) -> None:
    assert x.status == 200
    island = x.calling_island()
    job = Job.objects.get(island=island, job_id=x.path.split("/")[-2])
    assert x.payload["state"] == job.state
    if not x.payload["applied"]:
        x.nothing_written()
        return
    x.only(Job, Attempt, Island, KarmaEvent)
    assert x.changes[Job].changed.keys() == {job.pk} and not x.changes[Job].added
    if Attempt in x.changes:
        [attempt] = x.changes[Attempt].changed
        assert Attempt.objects.get(pk=attempt).job_id == job.pk
    assert x.changes[Job].changed[job.pk] <= {"state", "started_at", "finished_at", "error"}
    if Island in x.changes:
        assert x.changes[Island].changed.keys() == {island.pk}
        assert x.changes[Island].changed[island.pk] <= LEDGER_FIELDS
    if KarmaEvent in x.changes:
        assert {row["island_id"] for row in x.changes[KarmaEvent].added} == {island.pk}


def jobs_accepted(x: Exchange) -> None:
    body = x.decoded_body()
    if x.status == 200:
        assert x.payload["created"] is False
        x.nothing_written()
        return
    assert x.status == 201 and x.payload["created"] is True
    documented(JOB_ID_FORMAT, body["job_id"])
    for name in ("credits", "budget"):
        if name in body and not isinstance(body[name], Number):
            documented(CREDITS_FORMAT, body[name])
    # The job, its first attempt, the slot on its Island (and, when drawn, the
    # draw's clocks); an AssignJob only for an Island on NATS.
    x.only(Job, Attempt, Island, DrawClock, OutboxMessage)
    [row] = x.changes[Job].added
    assert not x.changes[Job].changed
    island_id = uuid.UUID(body["island_id"]) if "island_id" in body else row["island_id"]
    assert (row["job_id"], row["island_id"], row["state"]) == (body["job_id"], island_id, "assigned")
    [attempt] = x.changes[Attempt].added
    assert (attempt["job_id"], attempt["island_id"], attempt["number"]) == (row["id"], island_id, 1)
    assert x.changes[Island].changed.keys() == {island_id}
    assert x.changes[Island].changed[island_id] <= {"jobs_running", "draw_next", "draw_consumed"}


def ping_accepted(x: Exchange) -> None:
    assert (x.status, x.payload) == (200, {"success": True})
    x.nothing_written()


# --- The endpoints --------------------------------------------------------------------


def _mobile_bodies(w: World) -> list[Any]:
    return [
        {"secret": w.mobile.secret, "host_id": PHONE_HOST_ID, "device": IPHONE},
        {"code": w.mobile.code.lower(), "host_id": PHONE_HOST_ID, "device": PIXEL},
        {"secret": w.bob_mobile.secret, "host_id": BOB_PHONE_HOST, "device": PIXEL},
        {
            "code": w.bob_mobile.code,
            "host_id": HOST_ID,
            "device": {"platform": "ios", "model": "X", "runtime": "coreml"},
        },
    ]


PHONE_HEARTBEAT = {
    "status": "online",
    "timestamp": 1710000000000,
    "capabilities": {
        "device_model": "iPhone 15 Pro",
        "os_version": "18.1",
        "runtime": "coreml",
        "accelerator": "ane",
    },
}

ENDPOINTS = [
    Endpoint(
        "pairing",
        lambda w: "/api/v1/islands/pairing",
        lambda w: [
            {"host_id": "fresh-host-0001", "capabilities": CAPABILITIES, "version": "0.5.0"},
            {"host_id": PENDING_HOST, "capabilities": {**CAPABILITIES, "gpu_model": None, "region": "auto"}},
            {"host_id": HOST_ID},  # already paired
        ],
        lambda w: None,
        pairing_accepted,
    ),
    Endpoint(
        "pairing-poll",
        lambda w: "/api/v1/islands/pairing/poll",
        lambda w: [{"host_id": host, "device_secret": secret} for host, secret in w.device_secrets.items()],
        lambda w: None,
        poll_accepted,
    ),
    Endpoint(
        "mobile-pair", lambda w: "/api/v1/mobile/pair", _mobile_bodies, lambda w: None, mobile_pair_accepted
    ),
    Endpoint(
        "heartbeat",
        lambda w: "/api/v1/islands/heartbeat",
        lambda w: [AGENT_HEARTBEAT, MINIMAL_HEARTBEAT, {"status": "offline"}, PHONE_HEARTBEAT, {}],
        lambda w: f"Bearer {w.token}",
        heartbeat_accepted,
    ),
    Endpoint(
        "jobs-poll",
        lambda w: "/api/v1/islands/jobs/poll",
        lambda w: [{}, AGENT_HEARTBEAT],
        lambda w: f"Bearer {w.token}",
        jobs_poll_accepted,
    ),
    Endpoint(
        "maintenance",
        lambda w: "/api/v1/islands/maintenance",
        lambda w: [{"until": _in_hours(2)}, {"until": None}, {"until": _in_hours(23.9)}],
        lambda w: f"Bearer {w.token}",
        maintenance_accepted,
    ),
    Endpoint(
        "job-status",
        lambda w: "/api/v1/islands/jobs/job-0001/status",
        lambda w: [
            {"state": "started"},
            {"job_id": "job-0001", "state": "failed", "error": "Out of memory", "timestamp": 1710000000000},
            {"state": "succeeded", "timestamp": 100},
            {"state": "cancelled", "error": None},
        ],
        lambda w: f"Bearer {w.token}",
        job_status_accepted,
    ),
    Endpoint(
        "jobs",
        lambda w: "/api/v1/jobs",
        lambda w: [
            {
                "job_id": "job-new-1",
                "island_id": str(w.island.pk),
                "workload": "llm-chat",
                "credits": "2.5",
                "lease_seconds": 300,
            },
            {
                "job_id": "job-drawn-1",
                "workload": "llm-chat",
                "runtime": "container",
                "input": {"prompt": "Hello", "max_tokens": [1, 2.5, None]},
                "budget": "2.5",
                "requirements": {"min_vram_mb": 1024, "platform": "desktop"},
                "container_image": "registry.example.com/llm-chat:latest",
                "image_digest": "sha256:abcdef1234567890",
                "sandbox_tier": "standard",
                "lease_seconds": 300,
            },
            {
                "job_id": "job-0001",
                "island_id": str(w.island.pk),
                "workload": "llm-chat",
                "credits": 2.5,
                "lease_seconds": 1,
            },
            {
                "job_id": "job-new-2",
                "island_id": str(Island.objects.get(host_id=SUSPENDED_HOST).pk),
                "workload": "w",
                "credits": 0,
                "lease_seconds": 604_800,
            },
        ],
        lambda w: f"Bearer {w.dispatcher_key}",
        jobs_accepted,
    ),
    Endpoint(
        "ping", lambda w: "/api/v1/ping", lambda w: [{}, {"anything": 1}], lambda w: None, ping_accepted
    ),
]


def exchange(
    world: World,
    endpoint: Endpoint,
    body: bytes,
    *,
    method: str = "POST",
    path: str | None = None,
    authorization: str | None = "default",
    content_type: str = "application/json",
) -> None:
    """Send one request in a savepoint, check what the client sees and what the database holds."""
    path = path or endpoint.path(world)
    if authorization == "default":
        authorization = endpoint.authorization(world)
    with rolled_back():
        before = snapshot()
        response = send(method, path, body, authorization, content_type)
        after = snapshot()
        x = Exchange(
            world,
            path,
            body,
            authorization,
            response.status_code,
            client_view(response),
            changes(before, after),
        )
        if x.status >= 400:
            x.nothing_written()
        else:
            endpoint.accepted(x)


def test_the_valid_bodies_are_accepted(world):
    """The fuzzer starts from bodies that work: check they do, so mutations start from success."""
    for endpoint in ENDPOINTS:
        for body in endpoint.valid(world)[:1]:
            with rolled_back():
                response = send(
                    "POST", endpoint.path(world), fuzz.encode(body), endpoint.authorization(world)
                )
                assert response.status_code in (200, 201), (endpoint, response.content)


def _with_suffix(body: Any, path: fuzz.Path, suffix: str, in_key: bool) -> Any:
    body = copy.deepcopy(body)
    parent, step = fuzz.value_at(body, path[:-1]), path[-1]
    if in_key:
        parent[f"{step}{suffix}"] = parent.pop(step)
    else:
        parent[step] += suffix
    return body


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
def test_every_text_field_and_key_with_a_nul_or_a_newline(world, endpoint):
    """Not random: each string of each valid body, and each key, in turn.

    NUL (which PostgreSQL cannot store) and a trailing newline (which a
    pattern ending in $ lets through) are the two edits that broke this API;
    random mutations reach them only now and then.
    """
    for body in endpoint.valid(world):
        for path in fuzz.paths(body):
            if not path:
                continue
            keyed = isinstance(path[-1], str)
            for in_key in (False, True) if keyed else (False,):
                if not in_key and not isinstance(fuzz.value_at(body, path), str):
                    continue
                for suffix in ("\x00", "\n"):
                    exchange(world, endpoint, fuzz.encode(_with_suffix(body, path, suffix, in_key)))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
def test_every_raw_token_in_an_unknown_field_and_in_a_known_one(world, endpoint):
    """Not random either: each raw token and each invalid UTF-8 sequence, in two places.

    An unknown field is skipped unread by the decoder, but must still be
    JSON; a known one is decoded. Deep nesting and bad bytes broke the first.
    """
    body = endpoint.valid(world)[0]
    known = next(
        (path for path in fuzz.paths(body) if path and isinstance(fuzz.value_at(body, path), str)), None
    )
    for raw in fuzz.RAW_VALUES:
        exchange(world, endpoint, fuzz.splice(body, None, raw))
        if known:
            exchange(world, endpoint, fuzz.splice(body, known, raw))
    for raw in fuzz.INVALID_UTF8:
        exchange(world, endpoint, fuzz.splice(body, None, b'"' + raw + b'"'))
        if known:
            exchange(world, endpoint, fuzz.splice(body, known, raw, inside_a_string=True))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@EACH_EXAMPLE_ROLLS_BACK
@given(body=fuzz.json_bodies)
def test_any_json_is_answered_without_a_5xx_or_a_stray_write(world, endpoint, body):
    exchange(world, endpoint, body)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@EACH_EXAMPLE_ROLLS_BACK
@given(data=st.data())
def test_mutated_valid_bodies_are_accepted_or_refused_cleanly(world, endpoint, data):
    exchange(world, endpoint, data.draw(fuzz.mutations(endpoint.valid(world)), label="body"))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@EACH_EXAMPLE_ROLLS_BACK
@given(data=st.data())
def test_raw_bytes_are_refused_cleanly(world, endpoint, data):
    exchange(world, endpoint, data.draw(fuzz.raw_bodies(endpoint.valid(world)), label="body"))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@EACH_EXAMPLE_ROLLS_BACK
@given(data=st.data())
def test_odd_methods_content_types_and_credentials(world, endpoint, data):
    credentials = [
        f"Bearer {world.token}",
        f"Bearer {world.bob_token}",
        f"bearer   {world.token}  ",
        f"Bearer {world.dispatcher_key}",
        f"Token {world.token}",
        f"Bearer {world.token}\x00",
        f"Bearer {world.token[:-1]}",
        None,
    ]
    valid = endpoint.valid(world)
    exchange(
        world,
        endpoint,
        data.draw(st.one_of(st.sampled_from(valid).map(fuzz.encode), fuzz.mutations(valid)), label="body"),
        method=data.draw(
            st.sampled_from(["POST", "POST", "GET", "PUT", "PATCH", "DELETE", "OPTIONS"]), label="method"
        ),
        authorization=data.draw(
            st.one_of(st.sampled_from(credentials), fuzz.header_text()), label="authorization"
        ),
        content_type=data.draw(st.sampled_from(fuzz.CONTENT_TYPES), label="content_type"),
    )


JOB_STATUS = ENDPOINTS[5]


@EACH_EXAMPLE_ROLLS_BACK
@given(data=st.data())
def test_any_job_id_in_the_url_is_found_or_refused_cleanly(world, data):
    job_id = data.draw(
        st.one_of(
            st.sampled_from(world.job_ids),
            fuzz.odd_text(),
            st.sampled_from(["job-0001\n", ".", "..", "%", "a/b"]),
        ),
        label="job_id",
    )
    body = copy.deepcopy(data.draw(st.sampled_from(JOB_STATUS.valid(world)), label="body"))
    body.pop("job_id", None)
    path = f"/api/v1/islands/jobs/{quote(job_id, safe='')}/status"
    exchange(world, JOB_STATUS, fuzz.encode(body), path=path)


@EACH_EXAMPLE_ROLLS_BACK
@given(
    suffix=st.one_of(fuzz.odd_text(), st.sampled_from(["", "/", "islands", "islands/jobs//status", "jobs/"]))
)
def test_unknown_api_paths_answer_json(world, suffix):
    path = "/api/v1/" + quote(suffix, safe="/")
    exchange(world, ENDPOINTS[-1], b"{}", path=path)
