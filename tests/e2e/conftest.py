from __future__ import annotations

import pytest

from pyvhost.guest.image import ensure_image
from pyvhost.guest.lab import Lab


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def guest_image():
    return ensure_image(print)


@pytest.fixture
def lab(guest_image, tmp_path):
    labs = []

    def make(**kwargs) -> Lab:
        lab = Lab(image=guest_image, workdir=str(tmp_path), **kwargs).start()
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
