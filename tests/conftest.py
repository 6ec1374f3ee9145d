from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """The soak run is long: it runs only when asked for by name (-m soak)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the soak run: pytest -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
