"""The fault suite's ledger: every test here injects faults through the `fault` fixture, and the
run ends with one line saying how many were injected and how many the project survived (the test
that injected them passed: nothing lost, the promised message, the same final outputs)."""
import pytest

INJECTED: dict[str, list[str]] = {}      # test id -> the faults it injected
PASSED: set[str] = set()


@pytest.fixture
def fault(request):
    """Call `fault("SIGKILL pretrain after checkpoint 2")` at the moment a fault is injected."""
    faults = INJECTED.setdefault(request.node.nodeid, [])
    return faults.append


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        PASSED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if not INJECTED:
        return
    injected = sum(len(f) for f in INJECTED.values())
    survived = sum(len(f) for test, f in INJECTED.items() if test in PASSED)
    kinds = len(INJECTED)
    terminalreporter.write_line(
        f"faults: {injected} injected in {kinds} tests, {survived} survived with nothing lost"
        + ("" if survived == injected else f", {injected - survived} NOT survived (see the failures above)"))
