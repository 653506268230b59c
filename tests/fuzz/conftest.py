"""Prints how many inputs each fuzz target tried (and how they ended) after the session."""

from __future__ import annotations

from tests.fuzz.harness import OUTCOMES, SECONDS, TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if not TALLY:
        return
    terminalreporter.section("fuzz targets")
    for target in sorted(TALLY):
        ends = ", ".join(f"{k} {v}" for k, v in OUTCOMES.get(target, {}).most_common(4))
        terminalreporter.write_line(f"fuzz: {target:<28} {TALLY[target]:>5} inputs "
                                    f"{SECONDS[target]:6.1f} s  ({ends})")
