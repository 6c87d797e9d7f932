"""Shared pytest set-up: small, deterministic, CPU-only."""
import os

# Tests run on CPU; keep XLA from grabbing every core thread pool it can and keep output quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
