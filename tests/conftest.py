"""Test-wide setup: 8 fake CPU devices so sharding tests run anywhere (must happen before JAX starts)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
