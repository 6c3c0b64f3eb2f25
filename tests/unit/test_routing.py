"""The routing stamp, its validation and retry pinning (no Redis, no kombu)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

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
def warn_again() -> Iterator[None]:
    routing._malformed_warned.clear()
    yield
    routing._malformed_warned.clear()


def message(exchange: str = "", routing_key: str = "low", priority: Any = 9,
            headers: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """kombu's prepared message of a Celery task, as the channel's _put gets it."""
    return {
        "body": "e30=",
        "headers": {"id": "t1", "task": "t"} if headers is None else headers,
        "properties": {"priority": priority,
                       "delivery_info": {"exchange": exchange, "routing_key": routing_key}},
    }  # fmt: skip


def stamp_of(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: msg["headers"][k] for k in routing.HEADERS if k in msg["headers"]}


# -- the stamp ----------------------------------------------------------------------------------


def test_the_stamp_names_the_queue_the_message_goes_to() -> None:
    assert stamp_of(routing.stamped(message(), "low")) == STAMP


def test_through_an_exchange_the_stamp_keeps_exchange_and_routing_key() -> None:
    stamped = routing.stamped(message("bus", "events.user", None), "events")
    assert routing.origin_from_headers(stamped["headers"]) == Origin(
        "events", "bus", "events.user", None
    )


def test_each_queue_an_exchange_routes_to_gets_its_own_stamp() -> None:
    """kombu puts the same dict on every bound queue: the stamp must not leak across."""
    original = message("bus", "events.user")
    first, second = routing.stamped(original, "audit"), routing.stamped(original, "events")
    assert (first["headers"][QUEUE_HEADER], second["headers"][QUEUE_HEADER]) == ("audit", "events")
    assert stamp_of(original) == {}


def test_an_existing_stamp_is_kept() -> None:
    """A retry copies its request's headers: the first stamp survives a re-routed publish."""
    stamped = routing.stamped(message(priority=0, headers={"task": "t", **STAMP}), "high")
    assert stamp_of(stamped) == STAMP


def test_only_task_messages_are_stamped() -> None:
    plain = message(headers={"x": 1})
    assert routing.stamped(plain, "low") is plain


@pytest.mark.parametrize("priority", [None, "x", True])
def test_unusable_priority_is_stamped_as_none(priority: Any) -> None:
    assert routing.stamped(message(priority=priority), "low")["headers"][PRIORITY_HEADER] is None


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


# -- settings -----------------------------------------------------------------


def test_options_from_settings() -> None:
    assert routing.options_from(Settings()) == RoutingOptions("resilience.quarantine")
    assert routing.options_from(Settings(quarantine_queue="q")) == RoutingOptions("q")
    assert routing.options_from(Settings(routing=False)) is None
