"""The commands the atomic fetch sends, and its settings (no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_resilience import ConfigurationError, Settings
from celery_resilience.redis import fetch, keys
from celery_resilience.redis.fetch import FetchMixin, FetchOptions, FetchState
from celery_resilience.worker.ledger import Ledger

SEP = "\x06\x16"
LEDGER = Ledger("w")


class Chan(FetchMixin):
    """The attributes of kombu's channel that the fetch reads, around the real mixin."""

    sep, unacked_key, unacked_index_key, brpop_timeout = SEP, "unacked", "unacked_index", 1
    _chan_id = "c1"


def state_of(prefix: str = "", **kwargs: Any) -> FetchState:
    options = FetchOptions(wait=kwargs.pop("wait", 0.2))
    return FetchState("sha1", prefix, None, options, LEDGER, **kwargs)


def commands(state: FetchState, lists: list[str], **attrs: Any) -> list[tuple[Any, ...]]:
    chan = Chan()
    chan.__dict__.update(attrs)
    return chan._commands(state, lists)


# -- the commands a fetch sends ---------------------------------------------------------------


def test_a_fetch_after_a_message_does_not_wait() -> None:
    state = state_of()
    [evalsha] = commands(state, ["q", f"q{SEP}3"])
    assert evalsha[:7] == ("EVALSHA", "sha1", 7, "q", f"q{SEP}3", "unacked", "unacked_index")
    assert evalsha[7:10] == (keys.inflight(LEDGER.owner), "resilience.quarantine",
                             "resilience.owners")  # fmt: skip
    assert evalsha[11:] == ("c1", LEDGER.owner) and float(evalsha[10]) > 0
    assert state.pending == 1


def test_an_idle_fetch_waits_on_the_queue_of_the_last_message_with_the_prefix() -> None:
    state = state_of(prefix="p:", wait=0.5, wait_next=True, last_key="q")
    wait, evalsha = commands(state, ["q", f"q{SEP}3"])
    assert wait == ("BLMOVE", "p:q", "p:q", "RIGHT", "RIGHT", "0.5")
    assert evalsha[3:10] == ("p:q", f"p:q{SEP}3", "p:unacked", "p:unacked_index",
                             "p:" + keys.inflight(LEDGER.owner), "p:resilience.quarantine",
                             "p:resilience.owners")  # fmt: skip
    assert state.pending == 2


@pytest.mark.parametrize(("timeout", "wait", "sent"), [(1, 5, "1"), (None, 0.2, "0.2")])
def test_the_wait_never_outlasts_kombus_brpop_timeout(timeout: Any, wait: float, sent: str) -> None:
    [blmove, _] = commands(state_of(wait=wait, wait_next=True), ["q"], brpop_timeout=timeout)
    assert blmove[-1] == sent


def test_a_queue_the_last_message_is_not_in_any_more_waits_on_the_first_list() -> None:
    wait, _ = commands(state_of(wait_next=True, last_key="gone"), ["a", "b"])
    assert wait[1] == "a"


@pytest.mark.parametrize(
    ("last", "waits_on"),
    [
        (f"q{SEP}9", "q"),  # drained the low list: an urgent task must wake the worker
        (f"r{SEP}3", "r"),  # the other queue's most urgent list
        ("r", "r"),
    ],
)
def test_an_idle_fetch_waits_on_the_most_urgent_list_of_the_last_queue(
    last: str, waits_on: str
) -> None:
    lists = ["q", "r", f"q{SEP}3", f"r{SEP}3", f"q{SEP}9"]  # kombu's order
    assert fetch.wait_key(last, lists, SEP) == waits_on


def test_without_a_priority_zero_list_the_queues_first_step_is_waited_on() -> None:
    assert fetch.wait_key(f"q{SEP}9", [f"q{SEP}3", f"q{SEP}9"], SEP) == f"q{SEP}3"


# -- settings ---------------------------------------------------------------------------------


def test_fetch_defaults_are_the_documented_ones() -> None:
    s = Settings.from_conf({})
    assert (s.fetch, s.fetch_wait, s.fetch_heartbeat, s.fetch_orphan_timeout) == (
        True, 0.2, 2.0, 30.0,
    )  # fmt: skip
    assert fetch.options_from(s) == FetchOptions(0.2, 2.0, 30.0, "resilience.quarantine")
    assert fetch.options_from(Settings.from_conf({"resilience_fetch": "off"})) is None


@pytest.mark.parametrize(
    ("conf", "key"),
    [
        ({"resilience_fetch_wait": 0}, "resilience_fetch_wait"),
        ({"resilience_fetch_heartbeat": "soon"}, "resilience_fetch_heartbeat"),
        ({"resilience_fetch_orphan_timeout": 5}, "resilience_fetch_orphan_timeout"),
    ],
)
def test_bad_fetch_settings_name_their_key(conf: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_conf(conf)
    assert err.value.key == key


def test_the_lua_ships_with_the_package() -> None:
    assert "RPOP" in keys.script("fetch") and "TIME" in keys.script("heartbeat")
