"""A bound on log lines per cause: the first few, then one summary per interval. Pure.

Whoever can make a server write a log line per request (malformed frames, peers that leave
before their reply, expired leases) owns the disk and the alerting. A `LogBudget` lets the first
`burst` lines of a cause through in each `interval_s`, swallows the rest, and says how many it
swallowed in one summary line when the interval ends. The clock is passed in; nothing is
written here: callers write what `allow` and `summaries` give back.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Lines of one cause let through per interval, and the interval.
DEFAULT_BURST = 5
DEFAULT_INTERVAL_S = 60.0
#: Distinct causes tracked at once; further causes share one overflow cause.
MAX_CAUSES = 64


@dataclass(slots=True)
class _Window:
    started: float
    emitted: int = 0
    suppressed: int = 0


class LogBudget:
    """Rate-limits log lines per cause (e.g. "malformed request", "reply dropped").

    Parameters:
        burst: lines of one cause written per interval; the rest are counted.
        interval_s: length of the interval; a summary line follows each interval in which
            lines were swallowed.
    """

    def __init__(self, burst: int = DEFAULT_BURST, interval_s: float = DEFAULT_INTERVAL_S):
        self.burst = burst
        self.interval_s = interval_s
        self._windows: dict[str, _Window] = {}

    def allow(self, cause: str, now: float) -> bool:
        """Whether a line of `cause` may be written now (counted as swallowed if not)."""
        window = self._windows.get(cause)
        if window is None:
            if len(self._windows) >= MAX_CAUSES:
                cause = "other causes"
                window = self._windows.get(cause)
            if window is None:
                window = self._windows[cause] = _Window(now)
        if window.emitted < self.burst:
            window.emitted += 1
            return True
        window.suppressed += 1
        return False

    def summaries(self, now: float) -> list[str]:
        """One line per cause whose interval ended with lines swallowed; resets those causes."""
        return [line for _cause, line in self.summaries_by_cause(now)]

    def summaries_by_cause(self, now: float) -> list[tuple[str, str]]:
        """As `summaries`, each line with its cause (to write it at that cause's level).

        The cause is "other causes" for lines counted beyond MAX_CAUSES distinct causes.
        """
        lines = []
        for cause, window in list(self._windows.items()):
            if now - window.started < self.interval_s:
                continue
            if window.suppressed:
                lines.append(
                    (
                        cause,
                        f"{window.suppressed} more '{cause}' line(s) suppressed in the last "
                        f"{now - window.started:.0f} s (at most {self.burst} per "
                        f"{self.interval_s:g} s are written)",
                    )
                )
            del self._windows[cause]
        return lines

    def next_summary_at(self) -> float | None:
        """When the earliest pending summary is due (None when nothing was swallowed)."""
        due = [w.started + self.interval_s for w in self._windows.values() if w.suppressed]
        return min(due, default=None)
