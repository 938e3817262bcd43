"""`manage.py nats_setup`: the JOBS stream for a deploy, created or brought up to date, idempotently."""

import asyncio
import io
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from django.core.management import CommandError, call_command
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from archipelag.nats import DUPLICATE_WINDOW, STREAM_MAX_AGE, default_stream, redact
from tests.bridge.test_nats import delete_stream, fresh_prefix


def setup(url: str, prefix: str) -> str:
    out = io.StringIO()
    call_command("nats_setup", "--url", url, "--subject-prefix", prefix, stdout=out)
    return out.getvalue()


def stream(url: str, name: str, config: StreamConfig | None = None) -> Any:
    """The stream's config as the server has it (after adding `config` first, if given)."""

    async def info() -> Any:
        nc = await nats.connect(url)
        try:
            if config is not None:
                await nc.jsm().add_stream(config)
            return (await nc.jsm().stream_info(name)).config
        finally:
            await nc.close()

    return asyncio.run(info())


@pytest.fixture
def prefix(nats_url: str) -> Iterator[str]:
    prefix = fresh_prefix()
    yield prefix
    delete_stream(nats_url, default_stream(prefix))


def test_it_creates_the_stream_the_agent_and_the_sender_need(nats_url, prefix):
    name = default_stream(prefix)
    assert name == f"{prefix.rstrip('.')}_JOBS"
    printed = setup(nats_url, prefix)
    assert printed == (
        f"Created stream {name} on {redact(nats_url)}: subjects {prefix}host.*.jobs, workqueue retention, "
        "file storage, max_age 7 days, duplicate_window 2 hours.\n"
    )
    password = urlsplit(nats_url).password
    assert not password or password not in printed  # the service's password is never printed
    config = stream(nats_url, name)
    assert config.subjects == [f"{prefix}host.*.jobs"]
    assert (config.retention, config.storage) == (RetentionPolicy.WORK_QUEUE, StorageType.FILE)
    assert config.max_age == STREAM_MAX_AGE.total_seconds()
    assert config.duplicate_window == DUPLICATE_WINDOW.total_seconds()
    assert not config.deny_delete  # a job that moves on is deleted from it

    assert setup(nats_url, prefix) == f"Stream {name} on {redact(nats_url)} is up to date.\n"


def test_it_brings_an_older_stream_up_to_date_and_keeps_what_is_more_generous(nats_url, prefix):
    name = default_stream(prefix)
    older = StreamConfig(
        name=name,
        subjects=[f"{prefix}host.*.jobs", f"{prefix}extra.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=3600,
        duplicate_window=120,
    )
    stream(nats_url, name, older)
    assert setup(nats_url, prefix) == (
        f"Updated stream {name} on {redact(nats_url)}: max_age: 1 hour → 7 days; "
        "duplicate_window: 2 minutes → 2 hours.\n"
    )
    config = stream(nats_url, name)
    assert config.subjects == [f"{prefix}host.*.jobs", f"{prefix}extra.>"]
    assert (config.max_age, config.duplicate_window) == (7 * 86400, 7200)


def test_it_refuses_a_stream_whose_retention_cannot_be_changed(nats_url, prefix):
    name = default_stream(prefix)
    stream(nats_url, name, StreamConfig(name=name, subjects=[f"{prefix}host.*.jobs"]))  # limits, kept forever
    with pytest.raises(CommandError, match=r"workqueue retention.*nats stream rm"):
        setup(nats_url, prefix)
    assert stream(nats_url, name).retention == RetentionPolicy.LIMITS


def test_it_says_so_when_nats_does_not_answer():
    with pytest.raises(CommandError, match=r"could not set up stream JOBS on nats://127\.0\.0\.1:1"):
        call_command("nats_setup", "--url", "nats://127.0.0.1:1", stdout=io.StringIO())
