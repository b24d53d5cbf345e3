"""The out-of-distribution signal: relative reconstruction error, its percentile among atlas images, the verdict."""

from __future__ import annotations

import pytest
import torch

from revelio_hub.interpret.atlas_builder import build_atlas
from revelio_hub.interpret.ood import OODConfig, assess, image_reconstruction_error, ordinal
from revelio_hub.sae.model import KSparseAutoencoder


def _sae(granularity: str) -> KSparseAutoencoder:
    torch.manual_seed(0)
    sae = KSparseAutoencoder(6, 24, k=3, granularity=granularity)
    with torch.no_grad():
        sae.b_pre.copy_(torch.randn(6))
    return sae.eval()


def test_relative_error_is_the_fvu_like_ratio_per_image():
    sae = _sae("token")
    maps = torch.randn(3, 6, 4, 4)
    err = image_reconstruction_error(sae, maps)
    recon, _, _ = sae(maps)
    for i in range(3):
        resid = (maps[i] - recon[i]).pow(2).sum()
        total = (maps[i] - sae.b_pre[:, None, None]).pow(2).sum()
        assert err[i].item() == pytest.approx((resid / total).item(), rel=1e-5)
    # a pooled SAE judges the image's mean vector, the input it was trained on
    pooled = _sae("pooled")
    mean = maps.mean(dim=(2, 3))
    assert torch.allclose(image_reconstruction_error(pooled, maps), image_reconstruction_error(pooled, mean))


def test_atlas_keeps_the_error_distribution_and_ranks_new_errors():
    sae = _sae("pooled")
    x = torch.randn(200, 6)
    atlas = build_atlas([(x[:120], None, torch.arange(120)), (x[120:], None, torch.arange(120, 200))], sae=sae)
    errors = image_reconstruction_error(sae, x)
    q = atlas.meta["reconstruction_error"]["quantiles"]
    assert q[0] == pytest.approx(errors.min().item(), rel=1e-5) and q[-1] == pytest.approx(errors.max().item(), rel=1e-5)
    assert atlas.error_percentile(errors.median().item()) == pytest.approx(50, abs=1)
    assert atlas.error_percentile(errors.max().item() * 2) == 100.0
    assert atlas.error_percentile(0.0) == 0.0


def test_verdict_takes_the_worst_layer_and_says_so():
    ok = assess(0.03, 40.0, 0.9, OODConfig(99.5), layer="down_ft1", others={"bottleneck": (0.1, 60.0)})
    assert not ok.out_of_distribution and "Like the release's data" in ok.message
    assert "at layer bottleneck" in ok.message and "60th percentile" in ok.message  # the layer that decided
    bad = assess(0.03, 40.0, 0.99, OODConfig(99.5), layer="down_ft1", others={"bottleneck": (0.5, 100.0)})
    assert bad.out_of_distribution and "at layer bottleneck" in bad.message and "unreliable" in bad.message
    d = bad.to_dict()
    assert d["layers"]["bottleneck"]["error_percentile"] == 100.0 and d["error_percentile"] == 40.0
    none = assess(0.2, None)
    assert not none.out_of_distribution and "no out-of-distribution check" in none.message
    with pytest.raises(ValueError):
        OODConfig(max_percentile=10)


def test_percentiles_read_as_english_ordinals():
    """The verdict is prose a user reads: "71st percentile", never "71th"."""
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th", 21: "21st", 22: "22nd",
                23: "23rd", 71: "71st", 100: "100th", 101: "101st", 111: "111th", 112: "112th", 0: "0th"}
    assert {n: ordinal(n) for n in expected} == expected
    assert "at the 71st percentile" in assess(0.03, 71.2).message
    assert "at the 72nd percentile" in assess(0.03, 71.5).message  # rounded first, then named
    assert "at the 13th percentile" in assess(0.03, 13.0).message
