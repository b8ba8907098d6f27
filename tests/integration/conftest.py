"""The fault suite's markers: ``faults`` (every test of tests/integration/test_faults.py) and
``slow`` (its long runs, left out of a plain ``pytest`` run, so ``make test`` keeps the fast
subset). ``make test-faults`` selects them with ``-m faults``; any ``-m`` expression that
names ``slow`` or ``faults`` decides for itself."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the fault suite (tests/integration/test_faults.py)")
    config.addinivalue_line("markers", "slow: a long fault run; only when -m selects it (make test-faults)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = config.getoption("markexpr") or ""
    if "slow" in expression or "faults" in expression:
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
