"""Settings: defaults, Django-style names, and a ConfigurationError naming each bad key."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_resilience import ConfigurationError, ResilientTask, Settings
from celery_resilience.config import settings_for


def _conf(**values: Any) -> dict[str, Any]:
    return {f"resilience_{k}": v for k, v in values.items()}


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.from_conf({})
    assert (s.inprocess_budget, s.retry_backoff, s.retry_backoff_max, s.max_retries) == (
        10.0, 1.0, 30.0, 5,
    )  # fmt: skip
    assert s.retry_jitter is True


def test_django_namespace_is_read() -> None:
    class DjangoSettings:
        CELERY_RESILIENCE_MAX_RETRIES = 7
        CELERY_RESILIENCE_RETRY_BACKOFF = "0.5"

    app = Celery("t", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    s = settings_for(app)
    assert (s.max_retries, s.retry_backoff) == (7, 0.5)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("retry_backoff", -1, "between"),
        ("retry_backoff", "soon", "must be a number"),
        ("max_retries", 2.5, "whole number"),
        ("max_retries", True, "not a boolean"),
        ("inprocess_budget", -0.1, "between"),
        ("retry_jitter", "maybe", "true or false"),
        ("transient_errors", ["no.such.module:Err"], "importable"),
        ("terminal_errors", [int], "exception class"),
        ("routing", "perhaps", "true or false"),
        ("quarantine_queue", "", "non-empty queue name"),
        ("quarantine_queue", " padded ", "non-empty queue name"),
    ],
)
def test_bad_value_names_the_key(key: str, value: Any, needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_conf(_conf(**{key: value}))
    assert info.value.key == f"resilience_{key}"
    assert f"resilience_{key}=" in str(info.value) and needle in str(info.value)


def test_cap_below_base_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="resilience_retry_backoff_max=2"):
        Settings.from_conf(_conf(retry_backoff=5, retry_backoff_max=2))


def test_exception_paths_are_imported() -> None:
    s = Settings.from_conf(_conf(transient_errors="builtins.LookupError"))
    assert s.transient_errors == (LookupError,)


def test_task_attributes_win_over_settings_and_are_validated() -> None:
    app = Celery("t", set_as_current=False, task_cls=ResilientTask)
    app.conf.update(_conf(max_retries=9, retry_backoff_max=60, terminal_errors=[KeyError]))

    @app.task(max_retries=2, retry_backoff=True, terminal_errors=(LookupError,), shared=False)
    def step() -> None: ...

    @app.task(retry_backoff_max=-3, shared=False)
    def broken() -> None: ...

    policy = step.resilience_policy
    assert (policy.max_retries, policy.retry_backoff, policy.retry_backoff_max) == (2, 1.0, 60)
    assert policy.terminal_errors == (LookupError, KeyError)
    with pytest.raises(ConfigurationError, match=r"broken\.retry_backoff_max=-3"):
        broken.resilience_policy  # noqa: B018
