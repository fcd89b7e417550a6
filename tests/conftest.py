"""Strict JAX for every test: float64 available, no silent rank promotion."""

import jax
import numpy as np
import pytest

# float64 for the 1e-12 checks; every float32 test asks for float32 explicitly.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
  """`--dataset=npz:PATH` of 60 + 15 examples, 6 features, 3 separable classes."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 6)) * 2
  y_train, y_test = np.arange(60) % 3, np.arange(15) % 3
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, x_train=centers[y_train] + rng.normal(size=(60, 6)), y_train=y_train,
           x_test=centers[y_test] + rng.normal(size=(15, 6)), y_test=y_test)
  return f"npz:{path}"
