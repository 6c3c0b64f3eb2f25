"""install(app): which transport an app gets, and that a second install changes nothing."""

from __future__ import annotations

import logging
import ssl

import pytest
from celery import Celery
from kombu.transport import redis as kombu_redis

from celery_resilience import install
from celery_resilience.plugin import plugin_of
from celery_resilience.redis import SentinelTransport, Transport, TransportMixin
from celery_resilience.worker import steps


def installed(url: str, **conf: object) -> Celery:
    app = Celery("t", broker=url, set_as_current=False)
    app.conf.update(conf)
    return install(app, keepalive=False)


@pytest.mark.parametrize(
    ("url", "base"),
    [("redis://h:1/0", Transport), ("rediss://h:1/0", Transport),
     ("sentinel://h:26379;sentinel://g:26379", SentinelTransport)],
)  # fmt: skip
def test_a_redis_broker_gets_the_plugins_transport_bound_to_the_app(url: str, base: type) -> None:
    app = installed(url)
    transport = app.conf.broker_transport
    assert issubclass(transport, base) and transport is not base
    assert transport.plugin is plugin_of(app) and str(transport) == url.split(":")[0]
    assert app.connection_for_write().as_uri().startswith(url.split(":")[0] + "://")


def test_another_app_in_the_process_keeps_kombus_transport() -> None:
    installed("redis://h:1/0")
    other = Celery("other", broker="redis://h:1/0", set_as_current=False)
    assert other.conf.broker_transport is None
    assert type(other.connection_for_write().transport) is kombu_redis.Transport


def test_rediss_without_ssl_options_gets_kombus_own_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert installed("rediss://h:1/0").conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert "defaulting to insecure SSL behaviour" in caplog.text
    mine = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert installed("rediss://h:1/0", broker_use_ssl=mine).conf.broker_use_ssl == mine


def test_another_broker_steps_aside_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    app = installed("amqp://guest@localhost//")
    assert app.conf.broker_transport is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is not Redis" in warnings[0]


class Composed(TransportMixin, kombu_redis.Transport):
    """A project's own transport with the plugin's mixin composed in."""


@pytest.mark.parametrize(
    ("configured", "bound"),
    [(f"{__name__}:Composed", True), (Composed, True), ("kombu.transport.redis:Transport", False)],
)  # fmt: skip
def test_a_configured_transport_is_bound_only_with_the_mixin(
    configured: object, bound: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app = installed("redis://h:1/0", broker_transport=configured)
    transport = app.conf.broker_transport
    if bound:
        assert issubclass(transport, Composed) and transport.plugin is plugin_of(app)
    else:
        assert transport == configured and "Compose" in caplog.text


def test_installing_twice_changes_nothing() -> None:
    app = installed("redis://h:1/0")
    first, transport = plugin_of(app), app.conf.broker_transport
    install(app)
    assert plugin_of(app) is first and app.conf.broker_transport is transport
    names = [s.name for s in app.steps["worker"]]
    assert sorted(names) == sorted(s.name for s in steps.WORKER_STEPS)


def test_the_bound_steps_require_each_other_not_the_unbound_classes() -> None:
    app = installed("redis://h:1/0")
    bound = {s.name: s for s in app.steps["worker"]}
    check = bound["celery_resilience.SettingsCheck"]
    assert bound["celery_resilience.Delivery"].requires == (check,)
    assert all(s.plugin is plugin_of(app) for s in bound.values())


def test_a_url_changed_after_configuring_is_followed_at_worker_start() -> None:
    app = installed("redis://h:1/0")
    plugin = plugin_of(app)
    assert plugin is not None and plugin.serves(app.conf)
    app.conf.broker_url = "amqp://guest@localhost//"  # e.g. celery -b ... worker
    plugin.select_transport(app.conf)  # what the SettingsCheck step does
    assert app.conf.broker_transport is None
