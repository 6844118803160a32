"""The purification baselines (JPEG, bit depth, median filter): outputs in [0, 1], what each
transform does, their declared structure, and the harness attacking them adaptively."""

from __future__ import annotations

import pytest
import torch

from defenses.input_transforms import JPEG, BitDepth, MedianFilter


def _images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_bit_depth_quantises_to_the_levels():
    x = _images()
    out = BitDepth(2)(x)
    assert set(torch.unique(out * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert float((out - x).abs().max()) <= 1 / 6 + 1e-6


def test_median_filter_removes_isolated_impulses_and_keeps_flat_images():
    x = torch.full((1, 3, 9, 9), 0.5)
    assert torch.equal(MedianFilter(3)(x), x)
    x[0, :, 4, 4] = 1.0  # one salt pixel
    assert torch.allclose(MedianFilter(3)(x), torch.full_like(x, 0.5))
    with pytest.raises(ValueError, match="odd"):
        MedianFilter(2)


def test_jpeg_is_lossy_close_and_in_range():
    x = _images(size=32)
    out = JPEG(50)(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    err = float((out - x).abs().mean())
    assert 0.0 < err < 0.35  # noise images compress badly, but stay close on average
    smooth = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32).contiguous()
    assert float((JPEG(90)(smooth) - smooth).abs().mean()) < 0.02


def test_declared_structure_routes_bpda():
    from bench.artifacts import prepare_defense

    d, _ = prepare_defense("test_jpeg", {}, dataset="test_tiny", preset="tiny",
                           log=lambda m: None)
    s = d.structure
    assert s.has_preprocessor and not s.preprocessor_differentiable and not s.random
    x = _images(size=16)
    assert d(x).shape == (4, 10)
