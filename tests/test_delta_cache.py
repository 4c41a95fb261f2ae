"""The ΔW cache across generations: a budget smaller than a generation's ΔW must still hit
(a cyclic scan under plain LRU never does), and networks no longer used make room."""

from __future__ import annotations

import torch

from lib_scheduled_lora.core.delta_cache import DeltaCache

MB = 2**20


def _delta() -> torch.Tensor:
    return torch.zeros(MB // 4)  # 1 MiB of float32


def _generation(cache: DeltaCache, owner: object, keys: range) -> int:
    """One generation asking for ``keys`` in order (put on a miss, as the engine does); hits."""
    cache.begin_generation()
    hits = 0
    for key in keys:
        if cache.get(owner, key) is not None:
            hits += 1
        else:
            cache.put(owner, key, _delta())
    return hits


def test_a_working_set_larger_than_the_budget_keeps_a_stable_part_that_hits():
    cache, net = DeltaCache(3 * MB), object()
    assert _generation(cache, net, range(5)) == 0
    # Plain LRU would evict 0, 1, 2 while adding 3 and 4, then miss on all five again.
    for _ in range(3):
        assert _generation(cache, net, range(5)) == 3
    assert cache.bytes <= 3 * MB


def test_the_whole_working_set_hits_when_it_fits():
    cache, net = DeltaCache(8 * MB), object()
    _generation(cache, net, range(5))
    assert _generation(cache, net, range(5)) == 5


def test_text_encoder_and_unet_engines_keep_each_others_entries():
    # Every engine starts a generation: a te scope then a UNet pass, repeated, must both stay.
    cache, net = DeltaCache(4 * MB), object()
    for _ in range(2):
        _generation(cache, net, range(0, 2))  # te
        _generation(cache, net, range(10, 12))  # UNet
    assert _generation(cache, net, range(0, 2)) == 2
    assert _generation(cache, net, range(10, 12)) == 2


def test_a_network_no_longer_used_makes_room_one_generation_later():
    cache, old, new = DeltaCache(3 * MB), object(), object()
    _generation(cache, old, range(3))
    assert _generation(cache, new, range(3)) == 0  # the old network's entries were used just now
    assert _generation(cache, new, range(3)) == 0  # now they are stale: replaced
    assert _generation(cache, new, range(3)) == 3
    assert _generation(cache, old, range(3)) == 0


def test_an_entry_larger_than_the_budget_is_not_kept_and_a_smaller_budget_trims():
    cache, net = DeltaCache(MB // 2), object()
    assert not cache.put(net, "big", _delta())
    cache = DeltaCache(4 * MB)
    _generation(cache, net, range(4))
    cache.set_budget(2 * MB)
    assert cache.bytes == 2 * MB and len(cache) == 2
    assert cache.get(net, 3) is not None and cache.get(net, 0) is None  # least recently used went first
