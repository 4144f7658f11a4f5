"""Bidirectional attention really removes the causal mask in every layer (eager and SDPA), on tiny random
Llama / Qwen2 / Mistral and on the real SmolLM2-135M: changing token j changes position i < j only when
bidirectional. Padding is handled: pads change nothing, left and right padding agree. Run in float64 so that tolerances
can be tight (float32 noise reaches 1e-3 relative after 30 layers with SmolLM2's massive activations)."""
from __future__ import annotations

import pytest
import torch

from embed_core import attention as attn
from embed_core.backbone import BackboneSource, load_backbone
from embed_core.config import EmbedConfig

from .conftest import ARCHS

IMPLS = ("eager", "sdpa")


def _hidden(backbone, ids, mask, bidirectional):
    attn.set_causal(backbone, not bidirectional)
    kw = attn.backbone_inputs(ids, mask, bidirectional, next(backbone.parameters()).dtype)
    with torch.no_grad():
        out = backbone(**kw, output_hidden_states=True)
    return out.hidden_states


def _check_future_token_effect(backbone):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, 12), generator=g)
    mask = torch.ones_like(ids)
    j = 9
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 17) % 1000 + 10
    for bidirectional in (False, True):
        a = _hidden(backbone, ids, mask, bidirectional)
        b = _hidden(backbone, changed, mask, bidirectional)
        # every layer, every earlier position
        for layer in range(1, len(a)):
            diff = (a[layer][0, :j] - b[layer][0, :j]).abs().amax(-1)
            if bidirectional:
                assert (diff > 1e-6).all(), f"layer {layer}: some position before {j} ignores token {j} (still causal?)"
            else:
                assert diff.max() < 1e-9, f"layer {layer}: causal attention leaks the future ({diff.max():.2e})"
        # later positions are always affected
        assert (a[-1][0, j:] - b[-1][0, j:]).abs().max() > 1e-6


def _check_padding(backbone):
    g = torch.Generator().manual_seed(1)
    short = torch.randint(10, 1000, (5,), generator=g)
    long = torch.randint(10, 1000, (9,), generator=g)
    for bidirectional in (False, True):
        alone = _hidden(backbone, short[None], torch.ones(1, 5, dtype=torch.long), bidirectional)[-1][0]
        for side in ("left", "right"):
            ids = torch.full((2, 9), 2, dtype=torch.long)
            mask = torch.zeros(2, 9, dtype=torch.long)
            ids[1], mask[1] = long, 1
            sl = slice(4, 9) if side == "left" else slice(0, 5)
            ids[0, sl], mask[0, sl] = short, 1
            h = _hidden(backbone, ids, mask, bidirectional)[-1][0, sl]
            torch.testing.assert_close(h, alone, atol=1e-9, rtol=1e-9, msg=f"{side} padding changed real states")
            # pad token ids must not matter
            ids2 = ids.clone()
            ids2[0][mask[0] == 0] = 777
            h2 = _hidden(backbone, ids2, mask, bidirectional)[-1][0, sl]
            torch.testing.assert_close(h2, h, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_attention(tiny_dirs, arch, impl):
    cfg = EmbedConfig(base_model=str(tiny_dirs[arch]), attn_implementation=impl)
    backbone = load_backbone(BackboneSource(str(tiny_dirs[arch])), cfg, torch.float64)
    assert backbone.config._attn_implementation == impl
    _check_future_token_effect(backbone)
    _check_padding(backbone)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_smollm2_attention(smollm2_dir, impl):
    cfg = EmbedConfig(attn_implementation=impl)
    backbone = load_backbone(BackboneSource(str(smollm2_dir)), cfg, torch.float64)
    assert backbone.config.num_hidden_layers == 30
    _check_future_token_effect(backbone)
    _check_padding(backbone)


def test_bidirectional_mask_shape_and_values():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    m = attn.attention_mask_4d(mask, causal=False, dtype=torch.float32)
    assert m.shape == (2, 1, 3, 3)
    assert (m[0, 0, 1:, 0] < -1e30).all() and (m[0, 0, :, 1:] == 0).all()
    assert (m[1, 0, :2, 2] < -1e30).all() and (m[1, 0, :, :2] == 0).all()
    assert m[1, 0, 2, 2] == 0 and m[0, 0, 0, 0] == 0  # pad query rows see themselves: no NaN rows
    c = attn.attention_mask_4d(torch.tensor([[1, 1, 1]]), causal=True, dtype=torch.float32)[0, 0]
    assert ((c == 0) == torch.ones(3, 3, dtype=torch.bool).tril()).all()
    assert attn.position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 1]]
