"""GEO: shapes, both modes, the identity start of alignment mode, empty key sets."""

import pytest
import torch

from streammem.models.geo import GEO


@pytest.mark.parametrize("mode", ["attention", "alignment"])
def test_shapes(mode):
    torch.manual_seed(0)
    geo = GEO(dim=64, heads=16, mode=mode)
    assert geo(torch.randn(7, 64), torch.randn(300, 64)).shape == (7, 64)
    assert geo(torch.randn(7, 64), torch.zeros(0, 64)).shape == (7, 64)  # empty bank: self keys
    assert geo.weights(torch.randn(7, 64), torch.randn(30, 64)).sum(1).allclose(torch.ones(7))


def test_alignment_starts_as_identity_and_mixes_at_test():
    torch.manual_seed(0)
    geo = GEO(dim=32, heads=4, mode="alignment")
    q = torch.randn(5, 32)
    same = q[:1].repeat(9, 1)  # all keys equal: any attention returns that key
    geo.train()
    assert torch.allclose(geo(q, same), q[:1].expand(5, 32), atol=1e-5)
    geo.eval()
    assert torch.allclose(geo(q, same), 0.7 * q + 0.3 * q[:1], atol=1e-5)


def test_attention_mode_is_residual_and_values_are_raw_keys():
    torch.manual_seed(0)
    geo = GEO(dim=32, heads=4, mode="attention")
    q, k = torch.randn(3, 32), torch.randn(10, 32)
    att = geo.attend(q, k)
    assert torch.allclose(geo(q, k), q + att)
    # Scaling the keys' *values* path: with Wk fixed, att is linear in k only through the
    # values when attention weights are unchanged; doubling k with Wk re-scaled shows it.
    with torch.no_grad():
        geo.wk.weight.mul_(0.5)
    assert torch.allclose(geo.attend(q, 2 * k), 2 * att - geo.merge.bias, atol=1e-5)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="multiple of heads"):
        GEO(dim=30, heads=16)
    with pytest.raises(ValueError, match="mode"):
        GEO(dim=32, heads=4, mode="fusion")
    with pytest.raises(ValueError, match="expects q"):
        GEO(dim=32, heads=4)(torch.randn(2, 16), torch.randn(3, 16))
