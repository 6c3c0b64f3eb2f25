"""The routing stamp, its validation, retry pinning and the patch's undo (no Redis)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.signals import before_task_publish
from kombu import Exchange, Queue
from kombu.transport.redis import Channel

from celery_resilience import Settings, routing
from celery_resilience.routing import (
    EXCHANGE_HEADER,
    PRIORITY_HEADER,
    QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    Origin,
    RoutingOptions,
)

STAMP = {QUEUE_HEADER: "low", EXCHANGE_HEADER: "", ROUTING_KEY_HEADER: "low", PRIORITY_HEADER: 9}


@pytest.fixture(autouse=True)
def undo() -> Iterator[None]:
    routing._malformed_warned.clear()
    routing.enable(lambda: RoutingOptions())
    yield
    routing.disable()
    routing._malformed_warned.clear()


def publish_headers(**signal_kwargs: Any) -> dict[str, Any]:
    """What the before_task_publish receivers leave in a message's headers."""
    headers: dict[str, Any] = signal_kwargs.pop("headers", {"id": "t1", "task": "t"})
    signal_kwargs.setdefault("properties", {})
    before_task_publish.send(sender="t", body=(), headers=headers, **signal_kwargs)
    return headers


# -- the stamp ----------------------------------------------------------------------------------


def test_default_exchange_stamps_the_routing_key_as_queue() -> None:
    headers = publish_headers(exchange="", routing_key="low", properties={"priority": 9})
    assert {k: headers[k] for k in routing.HEADERS} == STAMP


def test_topic_exchange_stamps_the_declared_queue_bound_to_it() -> None:
    events = Queue("events", Exchange("bus", type="topic"), routing_key="events.#")
    other = Queue("other", Exchange("elsewhere", type="topic"), routing_key="#")
    headers = publish_headers(exchange="bus", routing_key="events.user", declare=[other, events])
    assert routing.origin_from_headers(headers) == Origin("events", "bus", "events.user", None)


def test_a_declared_queue_whose_binding_does_not_take_the_key_is_not_stamped() -> None:
    events = Queue("events", Exchange("bus", type="topic"), routing_key="events.#")
    headers = publish_headers(exchange="bus", routing_key="audit.login", declare=[events])
    assert routing.origin_from_headers(headers) == Origin(None, "bus", "audit.login", None)


def test_direct_exchange_queue_is_stamped_when_its_key_matches() -> None:
    jobs = Queue("jobs", Exchange("work", type="direct"), routing_key="jobs")
    assert routing.origin_of("work", "jobs", [jobs], {}).queue == "jobs"
    assert routing.origin_of("work", "other", [jobs], {}).queue is None


def test_exchange_object_and_unknown_queue() -> None:
    headers = publish_headers(exchange=Exchange("bus", type="topic"), routing_key="x.y")
    assert routing.origin_from_headers(headers) == Origin(None, "bus", "x.y", None)


def test_an_existing_stamp_is_kept() -> None:
    """A retry copies its request's headers: the first stamp survives a re-routed publish."""
    headers = publish_headers(headers=dict(STAMP), exchange="", routing_key="high",
                              properties={"priority": 0})  # fmt: skip
    assert headers == STAMP


def test_no_stamp_when_routing_is_off() -> None:
    routing.enable(lambda: None)
    headers = publish_headers(exchange="", routing_key="low", properties={"priority": 9})
    assert not any(name in headers for name in routing.HEADERS)


def test_no_stamp_after_disable() -> None:
    routing.disable()
    headers = publish_headers(exchange="", routing_key="low")
    assert not any(name in headers for name in routing.HEADERS)


@pytest.mark.parametrize("priority", [None, "x", True])
def test_unusable_priority_is_stamped_as_none(priority: Any) -> None:
    headers = publish_headers(exchange="", routing_key="low", properties={"priority": priority})
    assert headers[PRIORITY_HEADER] is None


# -- reading a stamp ----------------------------------------------------------------------------


def test_unstamped_headers_give_none_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert routing.origin_from_headers({"id": "t1"}) is None
    assert routing.origin_from_headers(None) is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "broken",
    [
        {PRIORITY_HEADER: "9"},
        {PRIORITY_HEADER: 256},
        {PRIORITY_HEADER: -1},
        {PRIORITY_HEADER: True},
        {QUEUE_HEADER: ""},
        {QUEUE_HEADER: 7},
        {EXCHANGE_HEADER: None},
        {ROUTING_KEY_HEADER: ["low"]},
    ],
)
def test_malformed_stamp_gives_none(broken: dict[str, Any]) -> None:
    assert routing.origin_from_headers({**STAMP, **broken}) is None


def test_a_missing_header_is_malformed() -> None:
    headers = dict(STAMP)
    del headers[PRIORITY_HEADER]
    assert routing.origin_from_headers(headers) is None


def test_malformed_stamps_warn_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="celery_resilience.routing")
    for value in ("9", 300, "x"):
        assert routing.origin_from_headers({**STAMP, PRIORITY_HEADER: value}) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("resilience: ignoring a malformed routing stamp")


def test_queue_none_is_a_valid_stamp() -> None:
    assert routing.origin_from_headers({**STAMP, QUEUE_HEADER: None, PRIORITY_HEADER: None}) == (
        Origin(None, "", "low", None)
    )


# -- retry pinning ------------------------------------------------------------------------------


def request(headers: dict[str, Any] | None) -> Any:
    return SimpleNamespace(headers=headers)


def test_retry_is_pinned_to_the_stamped_queue_and_priority() -> None:
    assert routing.retry_options(request(dict(STAMP)), {"x": 1}) == {
        "x": 1, "queue": "low", "priority": 9,
    }  # fmt: skip


def test_retry_through_an_exchange_keeps_exchange_and_routing_key() -> None:
    stamp = {**STAMP, QUEUE_HEADER: "events", EXCHANGE_HEADER: "bus",
             ROUTING_KEY_HEADER: "events.user", PRIORITY_HEADER: None}  # fmt: skip
    assert routing.retry_options(request(stamp), {}) == {
        "exchange": "bus", "routing_key": "events.user",
    }  # fmt: skip


def test_an_explicit_priority_wins() -> None:
    assert routing.retry_options(request(dict(STAMP)), {"priority": 1})["priority"] == 1


def test_an_explicit_destination_wins_and_drops_the_old_stamp() -> None:
    options = routing.retry_options(request({**STAMP, "custom": 1}), {"queue": "other"})
    assert options == {"queue": "other", "headers": {"custom": 1}}


@pytest.mark.parametrize("headers", [None, {"id": "t1"}, {**STAMP, PRIORITY_HEADER: "9"}])
def test_unstamped_or_malformed_requests_are_not_pinned(headers: Any) -> None:
    assert routing.retry_options(request(headers), {"x": 1}) == {"x": 1}


def test_no_pinning_when_routing_is_off() -> None:
    routing.enable(lambda: None)
    assert routing.retry_options(request(dict(STAMP)), {}) == {}


# -- settings, install and undo -----------------------------------------------------------------


def test_options_from_settings() -> None:
    assert routing.options_from(Settings()) == RoutingOptions("resilience.quarantine")
    assert routing.options_from(Settings(quarantine_queue="q")) == RoutingOptions("q")
    assert routing.options_from(Settings(routing=False)) is None


def test_enable_twice_patches_once_and_disable_restores_kombu() -> None:
    routing.disable()
    original = Channel.__dict__["_do_restore_message"]
    routing.enable(lambda: RoutingOptions())
    patched = Channel.__dict__["_do_restore_message"]
    routing.enable(lambda: RoutingOptions("q"))
    assert Channel.__dict__["_do_restore_message"] is patched is not original
    assert patched.__wrapped__ is original
    assert len([r for r in before_task_publish.receivers if r[0][0] == routing._DISPATCH_UID]) == 1
    routing.disable()
    assert Channel.__dict__["_do_restore_message"] is original
    assert not any(r[0][0] == routing._DISPATCH_UID for r in before_task_publish.receivers)


def test_a_failing_provider_turns_routing_off_with_one_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    routing._provider_warned.clear()

    def broken() -> RoutingOptions:
        raise ValueError("bad setting")

    routing.enable(broken)
    for _ in range(3):
        headers = publish_headers(exchange="", routing_key="low")
        assert QUEUE_HEADER not in headers
    assert [r.getMessage() for r in caplog.records] == [
        "resilience: routing settings unavailable; routing is off"
    ]
    routing._provider_warned.clear()
