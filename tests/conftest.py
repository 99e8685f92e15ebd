"""Test setup shared by the whole suite.

The host platform is split into 4 devices so that the sharding tests run on a CPU-only machine. The
flag must be set before jax is imported; it only affects the host (CPU) platform, so on a GPU machine
the GPU device count is unchanged and the sharding tests skip themselves if fewer than 4 devices exist.
"""
import os
import zlib

_FORCE_DEVICES = "--xla_force_host_platform_device_count=4"
if _FORCE_DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FORCE_DEVICES}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
  """A generator seeded from the test's node id: fresh inputs per test and case, yet reproducible."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
