from __future__ import annotations

import pytest

from pyvhost.testing import GuestRam


@pytest.fixture
def ram():
    with GuestRam(1 << 20) as ram:
        yield ram
