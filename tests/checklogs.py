"""A test fails when snapvol logs an error it did not declare (after S3QL's
pytest_checklogs): an ERROR or CRITICAL record from a `snapvol` logger in the test
process, or an ERROR/CRITICAL line or a traceback in the log file of a mount the test
ran (`fusemount.mounted_volume` hands its log here at unmount).

A logged error in a passing test is usually a real defect: the code saw something go
wrong and went on. A test that provokes an error on purpose declares it, by pattern
(`re.search` on the message, or on the whole traceback):

    @pytest.mark.expect_log_errors(r"cannot read block \\d+")
    def test_damaged_block(...): ...

or at run time, with the fixture: `expect_log_errors(r"already mounted")`. Every
declared pattern must match at least once, so a declaration cannot outlive the error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LOGGER = "snapvol"
MOUNT_LOG_LINE = re.compile(r"^\S+ snapvol mount\[\d+\] (?:ERROR|CRITICAL): ")
TRACEBACK = "Traceback (most recent call last):"


@dataclass
class _Watch:
    """What the running test may log, and what it logged that it did not declare."""

    expected: list[re.Pattern[str]] = field(default_factory=list)
    matched: set[int] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)

    def allowed(self, text: str) -> bool:
        for i, pattern in enumerate(self.expected):
            if pattern.search(text):
                self.matched.add(i)
                return True
        return False

    def see(self, where: str, text: str) -> None:
        if not self.allowed(text):
            self.unexpected.append(f"{where}: {text}")


_current: _Watch | None = None


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if _current is None:
            return
        text = record.getMessage()
        if record.exc_info:
            text += " [with a traceback]"
        _current.see(f"{record.name} {record.levelname}", text)


_handler = _Handler(logging.ERROR)


def check_mount_log(path: Path) -> None:
    """Note the ERROR/CRITICAL lines and tracebacks of the mount log at `path` against
    the running test's declarations (the test fails at its end if any is undeclared)."""
    if _current is None or not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    i = 0
    while i < len(lines):
        start, logged = i, bool(MOUNT_LOG_LINE.match(lines[i]))
        if logged:
            i += 1
        if i < len(lines) and lines[i].startswith(TRACEBACK):  # with the line it follows
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i]):
                i += 1
            i += 1  # the exception's own line
        elif not logged:
            i += 1
            continue
        what = "mount log" if logged else "traceback in mount log"
        _current.see(f"{what} {path.name}", "\n".join(lines[start:i]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_log_errors(*patterns): the test logs errors matching these "
        "regular expressions on purpose (each must match at least once)")
    logger = logging.getLogger(LOGGER)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)


@pytest.fixture(autouse=True)
def _check_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Autouse, so it is set up before and torn down after the test's other fixtures:
    errors logged while they set up or tear down (a mount's unmount) count too."""
    global _current
    watch = _Watch()
    for marker in request.node.iter_markers("expect_log_errors"):
        if not marker.args:
            raise pytest.UsageError("expect_log_errors needs at least one pattern")
        watch.expected.extend(re.compile(p) for p in marker.args)
    _current = watch
    try:
        yield
    finally:
        _current = None
    problems = [f"logged an undeclared error: {u}" for u in watch.unexpected]
    problems += [f"declared error never logged: {p.pattern!r}"
                 for i, p in enumerate(watch.expected) if i not in watch.matched]
    if problems:
        pytest.fail("\n".join(problems[:20]), pytrace=False)


@pytest.fixture
def expect_log_errors() -> Callable[[str], None]:
    """Declare, while the test runs, an error it logs on purpose (a regular expression)."""

    def expect(pattern: str) -> None:
        assert _current is not None, "expect_log_errors used outside a test"
        _current.expected.append(re.compile(pattern))

    return expect
