"""The fetch's commands, the in-flight bookkeeping and the patches' undo (no Redis)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import kombu
import pytest
from celery import Celery
from celery.concurrency.asynpool import AsynPool
from celery.worker import state
from kombu.transport.redis import Channel, QoS, Transport
from kombu.transport.virtual.base import Transport as VirtualTransport

from celery_resilience import ConfigurationError, Settings, fetch, inflight
from celery_resilience.fetch import FetchOptions, _ChannelFetch
from celery_resilience.reclaim import Reclaimer


@pytest.fixture(autouse=True)
def undo() -> Iterator[None]:
    yield
    fetch.disable()
    inflight.disable()


def channel(**attrs: Any) -> Any:
    defaults = {"unacked_key": "unacked", "unacked_index_key": "unacked_index",
                "brpop_timeout": 1, "sep": "\x06\x16"}  # fmt: skip
    return SimpleNamespace(**{**defaults, **attrs})


def commands(state_: _ChannelFetch, keys: list[str]) -> list[tuple[Any, ...]]:
    return fetch._commands(channel(), state_, keys)


def state_of(sha: str = "sha1", prefix: str = "", **kwargs: Any) -> _ChannelFetch:
    options = FetchOptions(wait=kwargs.pop("wait", 0.2))
    return _ChannelFetch(sha, prefix, None, options, **kwargs)


# -- the commands a fetch sends ---------------------------------------------------------------


def test_a_fetch_after_a_message_does_not_wait() -> None:
    state_ = state_of(chan_id="c1")
    [evalsha] = commands(state_, ["q", "q\x06\x163"])
    held = inflight.held_key()
    assert evalsha[:7] == ("EVALSHA", "sha1", 7, "q", "q\x06\x163", "unacked", "unacked_index")
    assert evalsha[7:10] == (held, "resilience.quarantine", "resilience.owners")
    assert evalsha[11:] == ("c1", inflight.owner()) and float(evalsha[10]) > 0
    assert state_.pending == 1


def test_an_idle_fetch_waits_on_the_queue_of_the_last_message_with_the_prefix() -> None:
    state_ = state_of(prefix="p:", wait=0.5, wait_next=True, last_key="q")
    wait, evalsha = commands(state_, ["q", "q\x06\x163"])
    assert wait == ("BLMOVE", "p:q", "p:q", "RIGHT", "RIGHT", "0.5")
    assert evalsha[3:10] == ("p:q", "p:q\x06\x163", "p:unacked", "p:unacked_index",
                             "p:" + inflight.held_key(), "p:resilience.quarantine",
                             "p:resilience.owners")  # fmt: skip
    assert state_.pending == 2


def test_the_wait_never_outlasts_kombus_brpop_timeout() -> None:
    assert fetch._wait(channel(brpop_timeout=1), FetchOptions(wait=5)) == "1"
    assert fetch._wait(channel(brpop_timeout=None), FetchOptions(wait=0.2)) == "0.2"


def test_a_queue_the_last_message_is_not_in_any_more_waits_on_the_first_list() -> None:
    state_ = state_of(wait_next=True, last_key="gone")
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


class Job:
    """A billiard job: it sits in the pool's job table while the pool tracks it."""

    def __init__(self, table: dict[int, Any], key: int, accepted: bool = True,
                 sent: bool = True) -> None:  # fmt: skip
        self._cache, self._job, self._accepted = table, key, accepted
        self._write_to = object() if sent else None
        table[key] = self


def test_a_held_message_runs_while_the_pool_tracks_its_job_and_until_acknowledged() -> None:
    table: dict[int, Any] = {}
    request, job = Request("a"), Job(table, 1)
    request._apply_result = weakref.ref(job)
    held = inflight.Held(message=None, run_id=None, request=weakref.ref(request))
    assert inflight.still_running(held)
    del table[1]  # the pool forgot it: no ack will ever come
    assert not inflight.still_running(held)
    table[1] = job
    request.acknowledged = True
    assert not inflight.still_running(held)
    assert not inflight.still_running(inflight.Held(None, None, None))  # request gone


def test_without_a_pool_job_table_a_task_runs_while_it_is_active() -> None:
    request = Request("t")  # threads/solo: no billiard job to look at
    held = inflight.Held(message=None, run_id=None, request=weakref.ref(request))
    assert not inflight.still_running(held)
    state.active_requests.add(request)
    try:
        assert inflight.still_running(held)
    finally:
        state.active_requests.discard(request)


def test_a_lost_connection_no_longer_makes_the_pool_forget_its_running_jobs() -> None:
    """Celery <= 5.6's AsynPool.flush empties the job table: running tasks never ack."""
    table: dict[int, Any] = {}
    running, sent = Job(table, 1), Job(table, 2, accepted=False)
    Job(table, 3, accepted=False, sent=False)  # still in the outbound buffer
    flush = inflight._patched_flush(lambda self: self._cache.clear())
    flush(SimpleNamespace(_cache=table, synack=False))
    assert table == {1: running, 2: sent}
    flush(SimpleNamespace(_cache=table, synack=True))  # Celery NACKs unaccepted jobs
    assert table == {1: running}


def test_the_owner_names_the_worker_and_the_process() -> None:
    name = inflight.owner()
    assert name.count(".") >= 2 and name.split(".")[-2].isdigit()
    assert inflight.held_key() == "resilience.inflight." + name


def test_a_collected_or_closed_channel_gets_its_connection_info_back() -> None:
    """kombu builds a pool from channel.connection.client: Connection.collect() sets the
    client to None, closing the channel sets channel.connection to None."""
    conninfo = object()
    seen = []

    def original(self: Any, asynchronous: bool = False) -> None:
        seen.append((self.connection.client, self.connection.default_port, self.db))

    patched = inflight._patched_connparams(original)
    transport = SimpleNamespace(client=conninfo, default_port=6379)
    chan = SimpleNamespace(connection=transport, db=3)
    patched(chan)  # remembered while the transport is whole
    transport.client = None
    patched(chan)
    chan.connection = None
    patched(chan)
    assert seen == [(conninfo, 6379, 3)] * 3
    assert (transport.client, chan.connection) == (None, None)  # kombu's state untouched


# -- undo -------------------------------------------------------------------------------------


def test_disable_puts_kombus_functions_back() -> None:
    originals = {(c, n): c.__dict__[n] for c, n in [
        (Channel, "_brpop_start"), (Channel, "_brpop_read"), (QoS, "append"),
        (Channel, "_connparams"), (QoS, "restore_unacked"), (QoS, "_remove_from_indices"),
        (AsynPool, "flush"),
    ]}  # fmt: skip
    polling = {
        (Channel, "_on_connection_disconnect"): Channel.__dict__["_on_connection_disconnect"]
    }
    stops_polling = kombu.VERSION[:2] < (5, 7)  # only there kombu stops on any disconnect
    if stops_polling:
        originals.update(polling)
    fetch.enable(lambda: FetchOptions())
    inflight.enable("w")
    fetch.enable(lambda: FetchOptions())  # twice: still one layer
    inflight.enable("w")
    assert all(c.__dict__[n].__wrapped__ is o for (c, n), o in originals.items())
    wrapped = hasattr(Channel.__dict__["_on_connection_disconnect"], "__wrapped__")
    assert wrapped == stops_polling
    assert Transport.__dict__["close_connection"].__wrapped__ is VirtualTransport.close_connection
    fetch.disable()
    inflight.disable()
    assert all(c.__dict__[n] is o for (c, n), o in {**originals, **polling}.items())
    assert "close_connection" not in Transport.__dict__  # inherited again


@pytest.mark.parametrize(("visibility", "due_after"), [(3600, 1200), (3, 1)])
def test_leases_are_renewed_every_third_of_the_visibility_timeout(
    visibility: float, due_after: float
) -> None:
    """Not at every heartbeat: renewing 10 000 leases takes the consumer's GIL ~70 ms."""
    app = Celery("leases", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": visibility}
    leases = Reclaimer(app, FetchOptions())
    assert leases._renewal_due()  # never renewed
    leases._renewed = time.monotonic() - 0.8 * due_after
    assert not leases._renewal_due()
    leases._renewed = time.monotonic() - due_after
    assert leases._renewal_due()


@pytest.mark.parametrize(
    ("last", "waits_on"),
    [
        ("q\x06\x169", "q"),  # drained the low list: an urgent task must wake the worker
        ("r\x06\x163", "r"),  # the other queue's most urgent list
        ("r", "r"),
    ],
)
def test_an_idle_fetch_waits_on_the_most_urgent_list_of_the_last_queue(
    last: str, waits_on: str
) -> None:
    keys = ["q", "r", "q\x06\x163", "r\x06\x163", "q\x06\x169"]  # kombu's order
    wait, _ = commands(state_of(wait_next=True, last_key=last), keys)
    assert wait[1:3] == (waits_on, waits_on)


def test_without_a_priority_zero_list_the_queues_first_step_is_waited_on() -> None:
    keys = ["q\x06\x163", "q\x06\x169"]  # priority_steps without 0
    wait, _ = commands(state_of(wait_next=True, last_key="q\x06\x169"), keys)
    assert wait[1] == "q\x06\x163"
