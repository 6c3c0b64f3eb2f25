"""The fetch's commands, the in-flight bookkeeping and the patches' undo (no Redis)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state
from kombu.transport.redis import Channel, QoS

from celery_resilience import ConfigurationError, Settings, fetch, inflight
from celery_resilience.fetch import FetchOptions, _ChannelFetch


@pytest.fixture(autouse=True)
def undo() -> Iterator[None]:
    yield
    fetch.disable()
    inflight.disable()


def channel(**attrs: Any) -> Any:
    defaults = {"unacked_key": "unacked", "unacked_index_key": "unacked_index",
                "brpop_timeout": 1}  # fmt: skip
    return SimpleNamespace(**{**defaults, **attrs})


def commands(state_: _ChannelFetch, keys: list[str], **options: Any) -> list[tuple[Any, ...]]:
    fetch.enable(lambda: FetchOptions(**options))
    return fetch._commands(channel(), state_, keys)


# -- the commands a fetch sends ---------------------------------------------------------------


def test_a_fetch_after_a_message_does_not_wait() -> None:
    state_ = _ChannelFetch("sha1", "", None, chan_id="c1")
    [evalsha] = commands(state_, ["q", "q\x06\x163"])
    held = inflight.held_key()
    assert evalsha[:7] == ("EVALSHA", "sha1", 7, "q", "q\x06\x163", "unacked", "unacked_index")
    assert evalsha[7:10] == (held, "resilience.quarantine", "resilience.owners")
    assert evalsha[11:] == ("c1", inflight.owner()) and float(evalsha[10]) > 0
    assert state_.pending == 1


def test_an_idle_fetch_waits_on_the_list_of_the_last_message_with_the_prefix() -> None:
    state_ = _ChannelFetch("sha1", "p:", None, wait_next=True, last_key="q\x06\x163")
    wait, evalsha = commands(state_, ["q", "q\x06\x163"], wait=0.5)
    assert wait == ("BLMOVE", "p:q\x06\x163", "p:q\x06\x163", "RIGHT", "RIGHT", "0.5")
    assert evalsha[3:10] == ("p:q", "p:q\x06\x163", "p:unacked", "p:unacked_index",
                             "p:" + inflight.held_key(), "p:resilience.quarantine",
                             "p:resilience.owners")  # fmt: skip
    assert state_.pending == 2


def test_the_wait_never_outlasts_kombus_brpop_timeout() -> None:
    assert fetch._wait(channel(brpop_timeout=1), FetchOptions(wait=5)) == "1"
    assert fetch._wait(channel(brpop_timeout=None), FetchOptions(wait=0.2)) == "0.2"


def test_a_queue_the_last_message_is_not_in_any_more_waits_on_the_first_list() -> None:
    state_ = _ChannelFetch("sha1", "", None, wait_next=True, last_key="gone")
    wait, _ = commands(state_, ["a", "b"])
    assert wait[1] == "a"


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


# -- in-flight bookkeeping --------------------------------------------------------------------


class Request:
    """What inflight.running() reads of a Celery request."""

    def __init__(self, tag: str, handed_to_pool: bool = False) -> None:
        self._message = SimpleNamespace(delivery_tag=tag)
        self._apply_result = (lambda: None) if handed_to_pool else None
        self.acknowledged = False


def test_running_tasks_are_the_active_ones_and_those_handed_to_the_pool() -> None:
    active, handed, waiting = Request("a"), Request("h", True), Request("w")
    state.active_requests.add(active)
    for r in (active, handed, waiting):
        state.reserved_requests.add(r)
    try:
        assert set(inflight.running()) == {"a", "h"}
    finally:
        state.active_requests.discard(active)
        for r in (active, handed, waiting):
            state.reserved_requests.discard(r)


def test_a_held_message_stops_running_once_acknowledged_or_gone() -> None:
    request = Request("a")
    held = inflight.Held(message=None, run_id=None, request=weakref.ref(request))
    assert inflight.still_running(held)
    request.acknowledged = True
    assert not inflight.still_running(held)
    assert not inflight.still_running(inflight.Held(None, None, None))


def test_the_owner_names_the_worker_and_the_process() -> None:
    name = inflight.owner()
    assert name.count(".") >= 2 and name.split(".")[-2].isdigit()
    assert inflight.held_key() == "resilience.inflight." + name


def test_a_collected_transport_gets_its_connection_info_back() -> None:
    """kombu builds a pool from transport.client; Connection.collect() set it to None."""
    conninfo = object()
    seen = []
    original = lambda self, asynchronous=False: seen.append(self.connection.client)  # noqa: E731
    patched = inflight._patched_connparams(original)
    chan = SimpleNamespace(connection=SimpleNamespace(client=conninfo))
    patched(chan)  # remembered while the transport is whole
    chan.connection.client = None
    patched(chan)
    assert seen == [conninfo, conninfo]


# -- undo -------------------------------------------------------------------------------------


def test_disable_puts_kombus_functions_back() -> None:
    originals = {(c, n): c.__dict__[n] for c, n in [
        (Channel, "_brpop_start"), (Channel, "_brpop_read"), (QoS, "append"),
        (Channel, "_connparams"), (QoS, "restore_unacked"), (QoS, "_remove_from_indices"),
    ]}  # fmt: skip
    fetch.enable(lambda: FetchOptions())
    inflight.enable("w")
    fetch.enable(lambda: FetchOptions())  # twice: still one layer
    inflight.enable("w")
    assert all(c.__dict__[n].__wrapped__ is o for (c, n), o in originals.items())
    fetch.disable()
    inflight.disable()
    assert all(c.__dict__[n] is o for (c, n), o in originals.items())
