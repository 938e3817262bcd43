"""POST /api/v1/islands/heartbeat and Island.objects.record_heartbeats."""

from datetime import timedelta

import msgspec
import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from islands.agent import EnhancedHeartbeat
from islands.models import Beat, HeartbeatOutcome, Island, StatusChange, hash_token
from tests.conftest import HOST_ID
from tests.islands.conftest import AGENT_HEARTBEAT, MINIMAL_HEARTBEAT, T0, beat, make_island, post_json

Outcome = HeartbeatOutcome

HEARTBEAT = "/api/v1/islands/heartbeat"
Status = Island.Status
Reason = StatusChange.Reason
Live = Island.LiveStatus


def changes(island):
    return list(
        island.status_changes.order_by("at", "pk").values_list("from_status", "to_status", "reason", "at")
    )


def decoded(payload=None):
    """A decoded heartbeat; the minimal one, naming no host, unless told otherwise."""
    return msgspec.convert(payload or {**MINIMAL_HEARTBEAT, "host_id": None}, EnhancedHeartbeat)


# --- What a heartbeat records ----------------------------------------------------


def test_the_agents_full_heartbeat_is_recorded(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        response = send_heartbeat()
    assert response.status_code == 200
    assert response.json() == {"success": True}
    island.refresh_from_db()
    assert island.last_heartbeat_at == T0
    assert island.offline_after == T0 + timedelta(seconds=45)
    assert island.status == Status.ONLINE
    assert island.agent_version == "0.4.0"
    assert island.ram_mb == 32768
    assert island.gpu_vram_mb == 24576
    assert island.gpu_model == "RTX 4090"  # not in heartbeats: kept from pairing
    assert island.cpu_cores == 16
    assert island.supported_runtimes == ["container", "wasm"]
    assert island.asking_prices == {"llm-chat": "2.0", "_default": "1.0"}
    assert island.metrics == {
        "active_jobs": 1,
        "timestamp": 1710000000000,
        "system": AGENT_HEARTBEAT["system"],
        "gpus": AGENT_HEARTBEAT["gpus"],
        "active_job_metrics": AGENT_HEARTBEAT["active_job_metrics"],
    }
    assert changes(island) == [(Status.OFFLINE, Status.ONLINE, Reason.FIRST_HEARTBEAT, T0)]


def test_the_minimal_heartbeat_is_enough(send_heartbeat, island):
    assert send_heartbeat(MINIMAL_HEARTBEAT).status_code == 200
    island.refresh_from_db()
    assert island.status == Status.ONLINE
    assert island.metrics["active_jobs"] == 0
    assert island.ram_mb == 65536  # nothing reported, the paired value stays


def test_optional_fields_may_be_null_or_absent(send_heartbeat, island):
    nulls = dict.fromkeys(
        [
            "host_id",
            "status",
            "active_jobs",
            "timestamp",
            "agent_version",
            "system",
            "gpus",
            "active_job_metrics",
            "performance_estimates",
            "asking_prices",
            "capabilities",
        ]
    )
    assert send_heartbeat(nulls).status_code == 200
    assert send_heartbeat({}).status_code == 200
    assert send_heartbeat({"system": {"cpu_percent": None}, "gpus": [{"index": None}]}).status_code == 200
    island.refresh_from_db()
    assert island.status_at(island.last_heartbeat_at) == Live.ONLINE


def test_unknown_fields_are_ignored(send_heartbeat, island):
    payload = {**AGENT_HEARTBEAT, "battery": {"level": 80}, "system": {"cpu_percent": 3, "npu": "yes"}}
    assert send_heartbeat(payload).status_code == 200
    island.refresh_from_db()
    assert island.metrics["system"] == {"cpu_percent": 3}
    assert "battery" not in island.metrics


def test_a_heartbeat_replaces_the_previous_picture(send_heartbeat, island):
    send_heartbeat()
    send_heartbeat({**MINIMAL_HEARTBEAT, "active_jobs": 0})
    island.refresh_from_db()
    assert island.metrics["gpus"] == []
    assert island.metrics["active_job_metrics"] == []
    # Pricing and runtimes are only sent while configured: none means none.
    assert island.asking_prices == {}
    assert island.supported_runtimes == []
    assert island.agent_version == "0.4.0"


def test_the_capabilities_extension_restates_hardware(send_heartbeat, island):
    send_heartbeat(
        {
            **MINIMAL_HEARTBEAT,
            "capabilities": {
                "gpu_model": "RTX 5090",
                "gpu_vram_mb": 32768,
                "cpu_cores": 24,
                "ram_mb": 131072,
            },
        }
    )
    island.refresh_from_db()
    assert island.hardware_summary == "RTX 5090 32 GB · 24 CPU cores · 128 GB RAM"


def test_a_phone_reports_its_model_and_runtime(client, alice):
    phone = make_island(alice, "phone-host-0001", kind=Island.Kind.MOBILE, gpu_model="", cpu_cores=None)
    token = phone.issue_token()
    payload = {
        "status": "online",
        "timestamp": 1,
        "capabilities": {
            "device_model": "iPhone 15 Pro",
            "runtime": "coreml",
            "accelerator": "ane",
            "ram_mb": 8192,
        },
    }
    assert post_json(client, HEARTBEAT, payload, token).status_code == 200
    phone.refresh_from_db()
    assert phone.hardware_summary == "iPhone 15 Pro · coreml / ane · 8 GB RAM"


# --- Online, offline, signed off -------------------------------------------------


def test_an_island_is_online_until_the_threshold_and_offline_after(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    island.refresh_from_db()
    assert island.status_at(T0 + timedelta(seconds=44.9)) == Live.ONLINE
    assert island.status_at(T0 + timedelta(seconds=45.1)) == Live.OFFLINE


def test_the_threshold_is_a_setting(send_heartbeat, island, settings):
    settings.ISLAND_OFFLINE_AFTER = 20
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    island.refresh_from_db()
    assert island.offline_after == T0 + timedelta(seconds=20)
    assert island.status_at(T0 + timedelta(seconds=19.9)) == Live.ONLINE
    assert island.status_at(T0 + timedelta(seconds=20.1)) == Live.OFFLINE


def test_an_island_that_never_beat_waits_for_its_first_heartbeat(island):
    assert island.status_at(T0) == Live.NEW
    assert not Island.objects.online(T0).exists()
    assert island.status_changes.count() == 0


def test_a_graceful_sign_off_shows_offline_at_once(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    with time_machine.travel(T0 + timedelta(seconds=5), tick=False):
        assert send_heartbeat({**AGENT_HEARTBEAT, "status": "offline", "active_jobs": 0}).status_code == 200
    island.refresh_from_db()
    assert island.status == Status.SIGNED_OFF
    assert island.status_at(T0 + timedelta(seconds=5)) == Live.SIGNED_OFF
    assert island.last_heartbeat_at == T0 + timedelta(seconds=5)
    assert changes(island)[-1] == (
        Status.ONLINE,
        Status.SIGNED_OFF,
        Reason.GRACEFUL,
        T0 + timedelta(seconds=5),
    )
    # The watcher has nothing to add: a signed-off Island is not overdue.
    assert not Island.objects.due_offline(T0 + timedelta(hours=1)).exists()


def test_a_repeated_sign_off_is_recorded_once(send_heartbeat, island):
    send_heartbeat()
    send_heartbeat({"status": "offline"})
    send_heartbeat({"status": "offline"})
    assert [reason for *_, reason, _ in changes(island)] == [Reason.FIRST_HEARTBEAT, Reason.GRACEFUL]


def test_a_heartbeat_after_a_sign_off_records_the_return(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    with time_machine.travel(T0 + timedelta(seconds=10), tick=False):
        send_heartbeat({"status": "offline"})
    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        send_heartbeat()
    island.refresh_from_db()
    assert island.status_at(T0 + timedelta(minutes=5)) == Live.ONLINE
    assert changes(island)[-1] == (
        Status.SIGNED_OFF,
        Status.ONLINE,
        Reason.BACK_ONLINE,
        T0 + timedelta(minutes=5),
    )


def test_a_late_heartbeat_records_the_silence_and_the_return(send_heartbeat, island):
    """Even if no watcher ran, the history says exactly when the Island was silent."""
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    with time_machine.travel(T0 + timedelta(seconds=100), tick=False):
        send_heartbeat()
    assert changes(island) == [
        (Status.OFFLINE, Status.ONLINE, Reason.FIRST_HEARTBEAT, T0),
        (Status.ONLINE, Status.OFFLINE, Reason.SILENCE, T0 + timedelta(seconds=45)),
        (Status.OFFLINE, Status.ONLINE, Reason.BACK_ONLINE, T0 + timedelta(seconds=100)),
    ]


def test_a_heartbeat_just_in_time_records_nothing(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    with time_machine.travel(T0 + timedelta(seconds=44.9), tick=False):
        send_heartbeat()
    assert len(changes(island)) == 1


def test_a_heartbeat_after_the_watcher_records_only_the_return(send_heartbeat, island):
    with time_machine.travel(T0, tick=False):
        send_heartbeat()
    assert len(Island.objects.record_silences(T0 + timedelta(seconds=50))) == 1
    with time_machine.travel(T0 + timedelta(seconds=60), tick=False):
        send_heartbeat()
    assert [reason for *_, reason, _ in changes(island)] == [
        Reason.FIRST_HEARTBEAT,
        Reason.SILENCE,
        Reason.BACK_ONLINE,
    ]


def test_a_suspended_island_keeps_reporting_but_shows_suspended(send_heartbeat, island):
    Island.objects.filter(pk=island.pk).update(suspended_at=T0)
    with time_machine.travel(T0, tick=False):
        assert send_heartbeat().status_code == 200
    island.refresh_from_db()
    assert island.last_heartbeat_at == T0
    assert island.status_at(T0) == Live.SUSPENDED


# --- Who may send one ------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwdw==",
        "Bearer isl_wrong",
        "Bearer not-a-token",
        "Token x",
    ],
)
def test_a_missing_or_wrong_token_gets_401_and_writes_nothing(client, island, token, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.post(HEARTBEAT, AGENT_HEARTBEAT, content_type="application/json", headers=headers)
    assert response.status_code == 401
    assert response.json()["success"] is False
    assert response["WWW-Authenticate"] == "Bearer"
    island.refresh_from_db()
    assert island.last_heartbeat_at is None


def test_the_bearer_scheme_is_case_insensitive(client, island, token):
    response = client.post(
        HEARTBEAT,
        MINIMAL_HEARTBEAT,
        content_type="application/json",
        headers={"Authorization": f"bearer {token}"},
    )
    assert response.status_code == 200


def test_a_removed_islands_token_gets_401(send_heartbeat, island):
    island.remove()
    response = send_heartbeat()
    assert response.status_code == 401
    island.refresh_from_db()
    assert island.last_heartbeat_at is None


def test_an_expired_phone_token_gets_401(client, alice):
    phone = make_island(alice, "phone-host-0002", kind=Island.Kind.MOBILE)
    with time_machine.travel(T0, tick=False):
        token = phone.issue_token()
    with time_machine.travel(T0 + timedelta(days=30, seconds=1), tick=False):
        assert post_json(client, HEARTBEAT, {"status": "online"}, token).status_code == 401
    with time_machine.travel(T0 + timedelta(days=29), tick=False):
        assert post_json(client, HEARTBEAT, {"status": "online"}, token).status_code == 200


def test_an_island_cannot_beat_for_another_host(send_heartbeat, island, bob):
    other = make_island(bob, "bob-host-00000001")
    response = send_heartbeat({**AGENT_HEARTBEAT, "host_id": other.host_id})
    assert response.status_code == 403
    assert Island.objects.filter(last_heartbeat_at__isnull=False).count() == 0
    assert StatusChange.objects.count() == 0


def test_only_post_is_allowed(client, token):
    response = client.get(HEARTBEAT, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 405


# --- Bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body is empty"),
        (b"   ", "body is empty"),
        (b"{not json", "not valid JSON"),
        (b"[]", "invalid body"),
        (b"null", "invalid body"),
        (b'"online"', "invalid body"),
        (b'{"status": 1}', "invalid status"),
        (b'{"active_jobs": -1}', "invalid active_jobs"),
        (b'{"active_jobs": 1.5}', "invalid active_jobs"),
        (b'{"timestamp": "1710000000000"}', "invalid timestamp"),
        (b'{"timestamp": -5}', "invalid timestamp"),
        (b'{"timestamp": 1e400}', "invalid timestamp"),
        (b'{"timestamp": 100000000000000000000000000000}', "invalid"),
        (b'{"host_id": "short"}', "invalid host_id"),
        (b'{"system": []}', "invalid system"),
        (b'{"system": {"memory_total_mb": -1}}', "invalid system.memory_total_mb"),
        (b'{"system": {"cpu_percent": "high"}}', "invalid system.cpu_percent"),
        (b'{"gpus": {}}', "invalid gpus"),
        (b'{"gpus": [{"memory_total_mb": 99999999999}]}', "invalid gpus[0].memory_total_mb"),
        (b'{"active_job_metrics": [{"job_id": 7}]}', "invalid active_job_metrics[0].job_id"),
        (b'{"asking_prices": {"llm-chat": 2.0}}', "invalid asking_prices"),
        (b'{"asking_prices": {"llm-chat": "cheap"}}', "invalid asking_prices"),
        (b'{"asking_prices": {"llm-chat": "-1"}}', "invalid asking_prices"),
        (b'{"asking_prices": {"llm-chat": "2.0\\n"}}', "invalid asking_prices"),
        # "\u0000" is valid JSON, but PostgreSQL stores no NUL: these were 500s there.
        (b'{"agent_version": "0.4\\u0000"}', "invalid agent_version: Expected `str` without NUL"),
        (b'{"asking_prices": {"llm\\u0000": "1.0"}}', "invalid asking_prices"),
        (b'{"active_job_metrics": [{"job_type": "\\u0000"}]}', "invalid active_job_metrics[0].job_type"),
        (b'{"capabilities": {"runtime": "onnx\\u0000"}}', "invalid capabilities.runtime"),
        (b'{"performance_estimates": {"supported_runtimes": ["\\u0000"]}}', "supported_runtimes[0]"),
        (b'{"host_id": "550e8400-e29b-41d4-a716-446655440000\\n"}', "invalid host_id"),
        (b'{"performance_estimates": {"supported_runtimes": "wasm"}}', "invalid performance_estimates"),
        (b'{"capabilities": {"cpu_cores": "many"}}', "invalid capabilities.cpu_cores"),
        (b'{"agent_version": "' + b"v" * 65 + b'"}', "invalid agent_version"),
        (b'{"gpus": [' + b"{}," * 64 + b"{}]}", "invalid gpus"),
        (b"[" * 5000 + b"]" * 5000, "invalid"),
        # An unknown field is skipped unread, recursively: this was a RecursionError and a 500.
        (b'{"cache": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body is not valid JSON: nested too deeply"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"agent_version": "caf\xe9"}', "not valid JSON: it is not UTF-8"),
    ],
)
def test_an_invalid_heartbeat_gets_400_and_writes_nothing(send_heartbeat, island, body, message):
    response = send_heartbeat(body)
    assert response.status_code == 400, response.content
    assert response.json()["success"] is False
    assert message in response.json()["error"]
    island.refresh_from_db()
    assert island.last_heartbeat_at is None
    assert island.metrics == {}
    assert StatusChange.objects.count() == 0


def test_a_heartbeat_over_the_size_limit_gets_413_and_writes_nothing(send_heartbeat, island):
    padding = "x" * (64 * 1024)
    response = send_heartbeat({**AGENT_HEARTBEAT, "padding": padding})
    assert response.status_code == 413
    assert response.json()["error"] == "body too large: at most 65536 bytes"
    island.refresh_from_db()
    assert island.last_heartbeat_at is None


def test_a_big_servers_heartbeat_fits(send_heartbeat, island):
    gpus = [{**AGENT_HEARTBEAT["gpus"][0], "index": n} for n in range(16)]
    jobs = [{**AGENT_HEARTBEAT["active_job_metrics"][0], "job_id": f"job-{n}"} for n in range(64)]
    assert send_heartbeat({**AGENT_HEARTBEAT, "gpus": gpus, "active_job_metrics": jobs}).status_code == 200
    island.refresh_from_db()
    assert len(island.metrics["active_job_metrics"]) == 64


# --- Cost: nothing grows with history -------------------------------------------


def test_a_heartbeat_costs_the_same_with_a_long_history(send_heartbeat, island):
    def queries_for_one_beat():
        with CaptureQueriesContext(connection) as queries:
            assert send_heartbeat().status_code == 200
        return [query["sql"] for query in queries.captured_queries]

    send_heartbeat()
    early = queries_for_one_beat()
    StatusChange.objects.bulk_create(
        StatusChange(
            island=island, at=T0, from_status=Status.ONLINE, to_status=Status.OFFLINE, reason=Reason.SILENCE
        )
        for _ in range(500)
    )
    late = queries_for_one_beat()
    assert len(late) == len(early)
    # The locking read, which is also the token check, and the update (plus
    # savepoint bookkeeping).
    work = [
        sql
        for sql in late
        if not sql.upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT"))
    ]
    assert len(work) == 2, work


# --- record_heartbeats, the one method every transport calls -----------------------


def by_host(host_id, heartbeat, at):
    return Beat(heartbeat, at, host_id=host_id)


def test_a_batch_by_host_id_applies_the_latest_beat_per_island(alice, bob):
    first = make_island(alice, "host-aaaaaaaa")
    second = make_island(bob, "host-bbbbbbbb")
    gone = make_island(bob, "host-cccccccc")
    gone.remove()
    older = decoded({"agent_version": "1.0"})
    newer = decoded({"agent_version": "2.0"})
    batch = [
        by_host("host-aaaaaaaa", newer, T0 + timedelta(seconds=2)),
        by_host("host-aaaaaaaa", older, T0 + timedelta(seconds=1)),
        by_host("host-bbbbbbbb", older, T0),
        by_host("host-cccccccc", newer, T0),
        by_host("never-paired-host", newer, T0),
    ]
    assert Island.objects.record_heartbeats(batch) == [
        Outcome.ACCEPTED,
        Outcome.STALE,
        Outcome.ACCEPTED,
        Outcome.UNAUTHORIZED,
        Outcome.UNAUTHORIZED,
    ]
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.agent_version == "2.0"
    assert first.last_heartbeat_at == T0 + timedelta(seconds=2)
    assert second.last_heartbeat_at == T0
    gone.refresh_from_db()
    assert gone.last_heartbeat_at is None


def test_one_batch_takes_beats_named_by_token_and_by_host_id(alice, bob):
    """The HTTP and NATS transports feed the same method; a batch may mix them."""
    by_token = make_island(alice, "token-host-0001")
    token = by_token.issue_token()
    named = make_island(bob, "named-host-0001")
    batch = [
        Beat(decoded(), T0, token_hash=hash_token(token)),
        by_host("named-host-0001", decoded(), T0),
        by_host("named-host-0001", decoded({"host_id": "token-host-0001"}), T0),
    ]
    assert Island.objects.record_heartbeats(batch) == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.WRONG_HOST]
    assert set(StatusChange.objects.values_list("island", "reason")) == {
        (by_token.pk, Reason.FIRST_HEARTBEAT),
        (named.pk, Reason.FIRST_HEARTBEAT),
    }


def test_a_beat_older_than_the_recorded_one_is_not_applied(island):
    Island.objects.record_heartbeats([by_host(island.host_id, decoded({"agent_version": "new"}), T0)])
    outcomes = Island.objects.record_heartbeats(
        [by_host(island.host_id, decoded({"agent_version": "old"}), T0 - timedelta(seconds=1))]
    )
    assert outcomes == [Outcome.STALE]
    island.refresh_from_db()
    assert island.agent_version == "new"
    assert island.last_heartbeat_at == T0


def test_a_batch_costs_the_same_for_two_islands_or_two_hundred(alice):
    def queries_for(count, prefix):
        hosts = [f"{prefix}-{n:08d}" for n in range(count)]
        Island.objects.bulk_create(Island(owner=alice, host_id=host, name=host) for host in hosts)
        with CaptureQueriesContext(connection) as queries:
            outcomes = Island.objects.record_heartbeats([by_host(host, decoded(), T0) for host in hosts])
        assert outcomes == [Outcome.ACCEPTED] * count
        return len(queries.captured_queries)

    assert queries_for(2, "small") == queries_for(200, "large")
    assert Island.objects.filter(status=Status.ONLINE).count() == 202
    assert StatusChange.objects.filter(reason=Reason.FIRST_HEARTBEAT).count() == 202


def test_a_batch_writes_nothing_when_empty(db):
    with CaptureQueriesContext(connection) as queries:
        assert Island.objects.record_heartbeats([]) == []
    assert queries.captured_queries == []


def test_host_id_in_the_body_matching_the_token_is_fine(send_heartbeat, island):
    assert send_heartbeat({**MINIMAL_HEARTBEAT, "host_id": HOST_ID}).status_code == 200


def test_routing_can_ask_for_online_islands_that_can_run_a_runtime(alice):
    up = make_island(alice, "desktop-up-0001")
    make_island(alice, "desktop-down-001")
    phone = make_island(alice, "phone-up-000001", kind=Island.Kind.MOBILE, runtime="coreml")
    beat([up, phone], T0)
    now = T0 + timedelta(seconds=10)
    assert list(Island.objects.can_run("container").online(now)) == [up]
    assert list(Island.objects.can_run("coreml").online(now)) == [phone]
    assert not Island.objects.can_run("container").online(T0 + timedelta(seconds=46)).exists()
