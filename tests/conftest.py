"""Test session set-up: 8 fake CPU devices and a shared compilation cache.

XLA reads the flags when the backend starts, so they are set before anything
imports jax.  Tests that need one device simply use ``jax.devices()[:1]``.
Subprocesses started by tests inherit the same environment.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The trainer tests compile the same small programs in several processes:
# JAX's persistent cache lets later ones load the executable instead.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "deml_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
