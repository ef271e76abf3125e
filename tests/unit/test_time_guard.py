"""The fast loop's guard: a test not marked `slow` that takes over `--max-test-seconds` fails, by name."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()

TESTS = """
import time
import pytest

def test_quick():
    pass

def test_sleepy():
    time.sleep(0.5)

@pytest.mark.slow
def test_sleepy_but_marked():
    time.sleep(0.5)
"""


def test_an_unmarked_slow_test_fails_by_name(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    pytester.makepyfile(test_some=TESTS)
    result = pytester.runpytest("--max-test-seconds", "0.2")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_sleepy: call took *over --max-test-seconds 0.2*"])


def test_without_the_option_slow_tests_are_only_listed(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    pytester.makepyfile(test_some="import time\ndef test_fine():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "not marked slow" not in result.stdout.str()


def test_under_two_workers_unmarked_slow_tests_are_still_listed(pytester):
    # The CI command runs `-n 2`: the list is printed by the controller from the workers' reports.
    pytester.makeconftest(CONFTEST.replace("FAST_LIMIT_S = 15.0", "FAST_LIMIT_S = 0.2"))
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    pytester.makepyfile(test_some=TESTS)
    result = pytester.runpytest("-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert "tests not marked slow over 0.2 s" in out and "test_some.py::test_sleepy" in out
    assert "test_sleepy_but_marked" not in out.split("tests not marked slow over")[1]
