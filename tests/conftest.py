"""Test-wide JAX setup: 8 fake CPU devices, a persistent compilation cache, fast compiles.

All must be set before jax is imported anywhere.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests compare values on tiny models, where XLA's optimization passes cost more than they
# save: without them tests/model/test_generate.py and tests/train/test_chunked_loss.py took
# 115 s instead of 166 s. Subprocesses the tests start inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
