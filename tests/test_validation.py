"""Input validation that needs no server: targets, windows, approval settings."""

from datetime import datetime, timedelta, timezone

import pytest

from blocks.errors import InvalidInput
from blocks.pgbackrest import format_target_time
from runbook.approval import check_approval_settings
from tasks.postgres import RecoverableWindow, check_target_in_window, parse_recovery_target

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
WINDOW = RecoverableWindow(earliest=NOW - timedelta(days=1), latest=NOW - timedelta(minutes=1))


def test_a_time_with_offset_and_a_restore_point_name_are_told_apart():
    assert parse_recovery_target("2026-11-23T10:00:00+01:00") == datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
    assert parse_recovery_target("2026-11-23T10:00:00Z").tzinfo is not None
    assert parse_recovery_target("before_incident_2026_11_23") == "before_incident_2026_11_23"


@pytest.mark.parametrize("value,fragment", [
    ("2026-11-23T10:00:00", "no time zone"),
    ("2026-13-45T10:00:00+00:00", "not a valid ISO-8601"),
    ("   ", "empty"),
])
def test_bad_targets_name_the_value(value, fragment):
    with pytest.raises(InvalidInput, match=fragment) as err:
        parse_recovery_target(value)
    if value.strip():
        assert repr(value.strip()) in str(err.value)


def test_the_window_refuses_future_early_and_late_targets_naming_both_values():
    with pytest.raises(InvalidInput, match="in the future"):
        check_target_in_window(NOW + timedelta(seconds=1), WINDOW, now=NOW)
    with pytest.raises(InvalidInput, match="before the earliest recoverable point") as err:
        check_target_in_window(WINDOW.earliest - timedelta(seconds=1), WINDOW, now=NOW)
    assert WINDOW.earliest.isoformat() in str(err.value)
    with pytest.raises(InvalidInput, match="after the latest recoverable point"):
        check_target_in_window(NOW - timedelta(seconds=30), WINDOW, now=NOW)
    check_target_in_window(NOW - timedelta(hours=1), WINDOW, now=NOW)


def test_pgbackrest_target_format_is_utc_with_microseconds():
    moment = datetime(2026, 11, 23, 10, 0, 0, 123999, tzinfo=timezone(timedelta(hours=2)))
    assert format_target_time(moment) == "2026-11-23 08:00:00.123999+00:00"
    with pytest.raises(InvalidInput, match="no time zone"):
        format_target_time(datetime(2026, 11, 23, 10, 0))


@pytest.mark.parametrize("policy,approvers,timeout,drill,fragment", [
    ("auto", [], 60, False, "only for drills"),
    ("required", [], 60, False, "at least one name"),
    ("required", ["  "], 60, False, "at least one name"),
    ("required", ["alice"], 0, False, "positive"),
    ("sometimes", ["alice"], 60, False, "'sometimes'"),
])
def test_approval_settings_that_could_skip_a_person_are_refused(policy, approvers, timeout, drill, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        check_approval_settings(policy, approvers, timeout, drill)
    check_approval_settings("auto", [], 60, True)
    check_approval_settings("required", ["alice"], 60, False)
