"""Settings read from the environment: the queue type and the consumer's prefetch."""

from __future__ import annotations

import pytest

from flow_repository.settings import Settings, SettingsError


def test_the_queue_type_defaults_to_classic_and_reads_quorum_in_any_case() -> None:
    assert Settings.from_env({}).event_queue_type == "classic"
    assert Settings.from_env({"EVENT_QUEUE_TYPE": " Quorum "}).event_queue_type == "quorum"


@pytest.mark.parametrize(("name", "value"), [
    ("EVENT_QUEUE_TYPE", "stream"), ("EVENT_QUEUE_TYPE", ""), ("CONSUMER_PREFETCH", "0"),
])
def test_unusable_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})
