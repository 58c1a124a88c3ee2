"""Suite-wide fixtures."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Give every test the environment it started with.

    Code under test exports torch.distributed variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) straight into
    os.environ, as a launcher must; monkeypatch only restores keys it touched itself, so without this a later
    in-process `pretrain()` would try to join a process group that does not exist and wait forever.
    """
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
