"""Test setup: 8 fake CPU devices for sharding tests, fp32 matmuls, quiet logs."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests must never reach a hub or the network for weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
