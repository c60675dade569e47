"""The bracketed selection behind the exact-k masks equals a full ``kthvalue``."""

import pytest
import torch

from optimum_mosaic.pruning import masks
from optimum_mosaic.pruning.masks import kth_smallest, lowest_k_mask


@pytest.mark.parametrize("n", [1000, 40_000, 331_776])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_kth_smallest_equals_kthvalue(n, q):
    g = torch.Generator().manual_seed(n)
    for flat in (torch.randn(n, generator=g).abs(), torch.randint(0, 7, (n,), generator=g).float()):  # + ties
        j = min(max(int(q * n), 1), n)
        assert kth_smallest(flat, j) == flat.kthvalue(j).values


@pytest.mark.parametrize("q", [0.0, 0.5, 0.7, 1.0])
def test_kth_smallest_over_several_chunks_equals_kthvalue(monkeypatch, q):
    """The bracket is counted and gathered chunk by chunk (comparison masks of one chunk at a time)."""
    monkeypatch.setattr(masks, "CHUNK", 30_000)
    n = 331_776
    g = torch.Generator().manual_seed(1)
    for flat in (torch.randn(n, generator=g).abs(), torch.randint(0, 7, (n,), generator=g).float()):
        j = min(max(int(q * n), 1), n)
        assert kth_smallest(flat, j) == flat.kthvalue(j).values


def test_kth_smallest_compares_one_chunk_at_a_time():
    from conftest import allocations

    flat = torch.randn(4 * masks.CHUNK, generator=torch.Generator().manual_seed(2))
    largest = allocations(lambda: kth_smallest(flat, flat.numel() // 2))[0]
    assert largest < flat.numel()  # < one byte per entry: no whole-size mask


def test_kth_smallest_falls_back_when_the_bracket_misses(monkeypatch):
    # a sample that sees only the first half of a sorted ramp brackets the wrong region
    flat = torch.arange(100_000, dtype=torch.float32)
    monkeypatch.setattr(torch, "randint", lambda n, size, generator=None: torch.arange(size[0]))
    calls = []
    kthvalue = torch.Tensor.kthvalue
    monkeypatch.setattr(torch.Tensor, "kthvalue", lambda self, j: calls.append(self.numel()) or kthvalue(self, j))
    assert kth_smallest(flat, 70_000) == 69_999.0
    assert calls[-1] == 100_000  # the full selection answered


def test_lowest_k_mask_is_exact_on_large_tied_scores():
    scores = torch.randint(0, 5, (300, 200), generator=torch.Generator().manual_seed(0)).float()
    assert scores.numel() > 4 * masks.SAMPLE
    mask = lowest_k_mask(scores, 31_234)
    assert int(mask.sum()) == 31_234
    assert scores[mask].max() <= scores[~mask].min()
