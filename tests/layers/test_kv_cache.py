"""KeyValueCache: appending in place equals concatenating, and the capacity is enforced."""

from __future__ import annotations

import pytest
import torch

from memtx.layers.attention import KeyValueCache


def _kv(length, heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, length, 4, generator=g), torch.randn(2, heads, length, 5, generator=g))


def test_extend_equals_concatenation_and_writes_in_place():
    prefix = _kv(6)
    cache = KeyValueCache(10, prefix)
    storage = cache.kv[0].untyped_storage().data_ptr()
    expected_k, expected_v = prefix
    for step, length in enumerate([1, 2, 1]):
        new = _kv(length, seed=step + 1)
        k, v = cache.extend(*new)
        expected_k = torch.cat((expected_k, new[0]), dim=2)
        expected_v = torch.cat((expected_v, new[1]), dim=2)
        assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
        assert k.untyped_storage().data_ptr() == storage  # no reallocation, no copy of the rest
    assert cache.length == 10


def test_empty_prefix_allocates_on_first_extend():
    cache = KeyValueCache(3, (torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 5)))
    with pytest.raises(ValueError, match="empty"):
        cache.kv
    new = _kv(2)
    k, v = cache.extend(*new)
    assert torch.equal(k, new[0]) and torch.equal(v, new[1])


def test_overflow_is_an_error():
    cache = KeyValueCache(4, _kv(3))
    with pytest.raises(ValueError, match="holds at most 4 keys, asked for 5"):
        cache.extend(*_kv(2))
