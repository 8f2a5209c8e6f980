"""The test-wide log check (tests/checklogs.py) itself: undeclared errors fail a test,
declared ones do not, a declaration must be used, and a mount log's ERROR lines and
tracebacks count like records of the test process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent

PROBE = textwrap.dedent('''
    import logging
    import pytest
    import checklogs

    log = logging.getLogger("snapvol.probe")

    def test_undeclared():
        log.error("boom %d", 1)

    @pytest.mark.expect_log_errors(r"boom \\d")
    def test_declared():
        log.error("boom %d", 2)

    @pytest.mark.expect_log_errors(r"never logged")
    def test_unused_declaration():
        pass

    def test_declared_at_run_time(expect_log_errors):
        expect_log_errors("bang")
        log.critical("bang")

    def test_warnings_and_other_loggers_pass():
        log.warning("only a warning")
        logging.getLogger("someone.else").error("not snapvol's")

    def test_exception_is_reported():
        try:
            raise ValueError("inner")
        except ValueError:
            log.exception("handler failed")

    def test_mount_log(tmp_path):
        path = tmp_path / "x.log"
        path.write_text(
            "2026-01-01T10:00:00.000Z snapvol mount[12] INFO: readahead window 1024 KiB\\n"
            "2026-01-01T10:00:01.000Z snapvol mount[12] ERROR: refresh failed\\n"
            "Traceback (most recent call last):\\n"
            '  File "x.py", line 1, in f\\n'
            "    g()\\n"
            "KeyError: 'k'\\n"
            "2026-01-01T10:00:02.000Z snapvol mount[12] WARNING: slow\\n"
            "Traceback (most recent call last):\\n"
            '  File "y.py", line 2, in h\\n'
            "RuntimeError: died\\n")
        checklogs.check_mount_log(path)

    @pytest.mark.expect_log_errors(r"ERROR: refresh failed(.|\\n)*KeyError", "RuntimeError: died")
    def test_mount_log_declared(tmp_path):
        test_mount_log(tmp_path)
''')


def test_checklogs_plugin(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(f'import sys\nsys.path.insert(0, {str(HERE)!r})\n'
                          'pytest_plugins = ["checklogs"]\n')
    pytester.makepyfile(test_probe=PROBE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=8, errors=4)  # an error in teardown per failing test
    text = result.stdout.str()
    assert "logged an undeclared error: snapvol.probe ERROR: boom 1" in text
    assert "declared error never logged: 'never logged'" in text
    assert "handler failed [with a traceback]" in text
    assert "mount log x.log: 2026-01-01T10:00:01.000Z snapvol mount[12] ERROR: refresh failed" \
        in text
    assert "traceback in mount log x.log: Traceback (most recent call last):" in text
    for name in ("test_declared ", "test_declared_at_run_time", "test_warnings_and_other",
                 "test_mount_log_declared"):
        assert f"ERROR test_probe.py::{name}" not in text
