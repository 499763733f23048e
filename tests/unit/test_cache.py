import torch

from headmods import KVCache


def _kv(T, B=2, h=3, d=4):
    return torch.randn(B, h, T, d), torch.randn(B, h, T, d)


def test_growing_cache_returns_everything_appended():
    cache = KVCache()
    ks, vs = [], []
    for T in (5, 1, 1, 20, 3):
        k, v = _kv(T)
        ks.append(k)
        vs.append(v)
        k_all, v_all = cache.update(k, v)
        assert torch.equal(k_all, torch.cat(ks, dim=2)) and torch.equal(v_all, torch.cat(vs, dim=2))
    assert cache.seq_len == 30 and cache.capacity >= 30


def test_growth_is_geometric():
    cache = KVCache()
    capacities = set()
    for _ in range(200):
        cache.update(*_kv(1))
        capacities.add(cache.capacity)
    assert len(capacities) <= 5  # 16, 32, 64, 128, 256: O(log n) reallocations


def test_preallocated_cache_allocates_once():
    cache = KVCache(max_len=10)
    cache.update(*_kv(2))
    storage = cache.k.data_ptr()
    for _ in range(8):
        cache.update(*_kv(1))
    assert cache.k.data_ptr() == storage and cache.capacity == 10 and cache.seq_len == 10


def test_reset_allows_a_new_shape():
    cache = KVCache()
    cache.update(*_kv(3, B=2))
    cache.reset()
    k, v = _kv(2, B=5)
    k_all, _ = cache.update(k, v)
    assert torch.equal(k_all, k) and cache.seq_len == 2


def test_cache_buffers_follow_module_dtype_moves():
    cache = KVCache()
    cache.update(*_kv(2))
    cache.double()
    assert cache.k.dtype == torch.float64
    assert "k" not in cache.state_dict()  # caches are not saved with a model
