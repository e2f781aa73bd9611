"""Seeded permutations of [0, n) evaluated index by index, in O(1) memory.

A task that splits and corrupts a corpus of 10^8 examples cannot hold a permutation table (800 MB
of int64) or a per-example mask on every host. ``Permutation`` is a bijection computed from the
index alone: a 4-round Feistel network over the smallest power-of-four domain ≥ n (so both halves
have the same width), restricted to [0, n) by cycle walking (re-applying the network until the
value lands inside [0, n); since the domain is < 4n, that takes < 4 rounds on average). Its inverse
is computed the same way, so "which example has rank r" is as cheap as "what rank has example i".
Vectorised over numpy arrays of indices; the same (n, seed) gives the same permutation on every
host and in every run.
"""

import numpy as np

ROUNDS = 4
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit avalanche of (x, key) (splitmix64's finaliser)."""
    z = (x + key) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


class Permutation:
    """``p(i)`` for i in [0, n): a seeded bijection; ``p.inverse(j)`` undoes it."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = int(n)
        self._half = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 4^half >= n
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.default_rng([seed, 0x5EED]).integers(
            0, 2**63, size=ROUNDS, dtype=np.uint64
        )

    def _network(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h, m = np.uint64(self._half), self._mask
        left, right = x >> h, x & m
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & m)
        return (left << h) | right

    def _network_inverse(self, x: np.ndarray) -> np.ndarray:
        h, m = np.uint64(self._half), self._mask
        left, right = x >> h, x & m
        for key in self._keys[::-1]:
            left, right = right ^ (_mix(left, key) & m), left
        return (left << h) | right

    def _walk(self, x: np.ndarray, step) -> np.ndarray:
        y = step(x)
        outside = y >= self.n
        while outside.any():
            y[outside] = step(y[outside])
            outside = y >= self.n
        return y

    def _check(self, i: np.ndarray | int) -> np.ndarray:
        i = np.asarray(i, np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"index outside [0, {self.n})")
        return np.atleast_1d(i).astype(np.uint64)

    def __call__(self, i: np.ndarray | int) -> np.ndarray:
        shape = np.shape(i)
        y = self._walk(self._check(i), lambda x: self._network(x, self._keys))
        return y.astype(np.int64).reshape(shape)

    def inverse(self, j: np.ndarray | int) -> np.ndarray:
        shape = np.shape(j)
        x = self._walk(self._check(j), self._network_inverse)
        return x.astype(np.int64).reshape(shape)


def uniform(seed: int, i: np.ndarray) -> np.ndarray:
    """A float in [0, 1) per index, a function of (seed, i) only (e.g. a per-example offset)."""
    key = np.uint64(np.random.default_rng([seed, 0xF10A7]).integers(0, 2**63))
    bits = _mix(np.asarray(i, np.int64).astype(np.uint64), key) >> np.uint64(11)
    return bits.astype(np.float64) / float(2**53)
