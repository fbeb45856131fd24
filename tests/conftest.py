"""Test session set-up: 8 fake CPU devices for the parallel tests.

XLA reads the flag when the backend starts, so it is set before anything
imports jax.  Tests that need one device simply use ``jax.devices()[0]``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
