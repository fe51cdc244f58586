"""LogBudget: the first few lines of a cause, then one summary per interval; plain numbers."""

from __future__ import annotations

import re
import time

import pytest

from labmesh.logbudget import DEFAULT_BURST, DEFAULT_INTERVAL_S, MAX_CAUSES, LogBudget

pytestmark = pytest.mark.unit

SUMMARY = re.compile(r"^(\d+) more '(.+)' line\(s\) suppressed in the last \d+ s ")


def suppressed(lines: list[str]) -> dict[str, int]:
    """{cause: count} from summary lines (each cause at most once per call)."""
    out: dict[str, int] = {}
    for line in lines:
        match = SUMMARY.match(line)
        assert match, line
        assert match[2] not in out, lines
        out[match[2]] = int(match[1])
    return out


def test_defaults():
    budget = LogBudget()
    assert (budget.burst, budget.interval_s) == (DEFAULT_BURST, DEFAULT_INTERVAL_S) == (5, 60.0)


def test_the_burst_is_let_through_and_the_rest_swallowed_per_cause():
    budget = LogBudget(burst=3, interval_s=10)
    assert [budget.allow("malformed request", 0.0) for _ in range(5)] == [True] * 3 + [False] * 2
    # another cause has its own burst
    assert [budget.allow("reply dropped", 1.0) for _ in range(4)] == [True] * 3 + [False]
    assert budget.allow("malformed request", 9.9) is False


def test_summary_counts_are_exact_and_come_only_after_the_interval():
    budget = LogBudget(burst=5, interval_s=60)
    for i in range(1234):
        budget.allow("malformed request", i * 0.01)  # 0 .. 12.33 s
    for _ in range(7):
        budget.allow("reply dropped", 30.0)  # its window starts at 30 s
    assert budget.next_summary_at() == 60.0
    assert budget.summaries(0.0) == budget.summaries(59.999) == []
    lines = budget.summaries(60.0)
    assert suppressed(lines) == {"malformed request": 1229}
    assert lines[0] == (
        "1229 more 'malformed request' line(s) suppressed in the last 60 s "
        "(at most 5 per 60 s are written)"
    )
    assert budget.next_summary_at() == 90.0
    assert budget.summaries(89.0) == []
    assert suppressed(budget.summaries(90.0)) == {"reply dropped": 2}
    # each summary is given once; nothing is pending any more
    assert budget.summaries(1000.0) == [] and budget.next_summary_at() is None


def test_a_new_interval_starts_with_a_fresh_burst():
    budget = LogBudget(burst=2, interval_s=5)
    assert [budget.allow("x", 0.0) for _ in range(3)] == [True, True, False]
    assert suppressed(budget.summaries(5.0)) == {"x": 1}
    assert [budget.allow("x", 6.0) for _ in range(3)] == [True, True, False]
    assert budget.summaries(10.9) == []
    assert suppressed(budget.summaries(11.0)) == {"x": 1}


def test_no_summary_when_nothing_was_swallowed():
    budget = LogBudget(burst=5, interval_s=1)
    for _ in range(5):
        assert budget.allow("record expired", 0.0)
    assert budget.next_summary_at() is None
    assert budget.summaries(100.0) == []
    # and the cause's window is gone: a fresh burst later
    assert all(budget.allow("record expired", 100.0) for _ in range(5))


def test_causes_beyond_the_limit_share_one_bounded_overflow_cause():
    budget = LogBudget(burst=1, interval_s=60)
    extra = 1000
    allowed = [budget.allow(f"cause {i}", 0.0) for i in range(MAX_CAUSES + extra)]
    # every tracked cause gets its burst; the overflow cause gets one burst between them
    assert sum(allowed) == MAX_CAUSES + 1
    assert all(allowed[:MAX_CAUSES])
    assert len(budget._windows) == MAX_CAUSES + 1  # bounded however many causes come
    for i in range(MAX_CAUSES + extra):  # a second round: only tracked causes keep windows
        budget.allow(f"cause {i}", 1.0)
    assert len(budget._windows) == MAX_CAUSES + 1
    counts = suppressed(budget.summaries(60.0))
    assert counts.pop("other causes") == 2 * extra - 1
    assert counts == {f"cause {i}": 1 for i in range(MAX_CAUSES)}


def test_thousands_of_calls_take_milliseconds():
    budget = LogBudget()
    causes = ["malformed request", "reply dropped", "record expired", "HTTP request failed"]
    started = time.perf_counter()
    written = 0
    for i in range(40_000):
        written += budget.allow(causes[i % 4], i * 1e-4)  # 4 s of calls
    lines = budget.summaries(61.0)
    elapsed = time.perf_counter() - started
    assert written == 4 * 5
    assert sum(suppressed(lines).values()) == 40_000 - written
    assert elapsed < 0.5, f"{elapsed:.3f} s for 40,000 calls"


def test_summaries_by_cause_names_the_cause_of_each_line():
    budget = LogBudget(burst=1, interval_s=1)
    budget.allow("a", 0.0)
    budget.allow("a", 0.0)
    budget.allow("b", 0.0)
    assert budget.summaries_by_cause(1.0) == [
        ("a", "1 more 'a' line(s) suppressed in the last 1 s (at most 1 per 1 s are written)")
    ]
