"""The fault suite's ledger: every test here injects faults through the `fault` fixture, and the
run ends with one line saying how many were injected and how many the project survived (the test
that injected them passed: nothing lost, the promised message, the same final outputs). The count
travels with the test's reports (a user property per fault), so `make test`'s pytest-xdist workers
report theirs to the process that prints the line (tests/conftest.py)."""
import pytest


@pytest.fixture
def fault(request):
    """Call `fault("SIGKILL pretrain after checkpoint 2")` at the moment a fault is injected."""
    return lambda what: request.node.user_properties.append(("fault", what))
