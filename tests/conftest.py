"""Shared fixtures: the real MNIST, verified once per test session."""

import pytest

from data import mnist


@pytest.fixture(scope="session")
def mnist_cache_dir(tmp_path_factory) -> str:
    """A cache dir holding the verified canonical mnist.npz, filled from the offline copy."""
    cache = tmp_path_factory.mktemp("mnist_cache")
    mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    return str(cache)


@pytest.fixture(scope="session")
def mnist_arrays(mnist_cache_dir) -> mnist.Mnist:
    """The verified MNIST arrays (uint8), from the session's cache."""
    return mnist.load(cache_dir=mnist_cache_dir, allow_network=False)[0]
