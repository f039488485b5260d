"""Vision encoder stems: the linear patchify (official ViT) and the convolutional stem of the default model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from xvlm.checkpoint import load_pretrained, save_pretrained
from xvlm.config import ViTVisionConfig, XVLMConfig
from xvlm.models.vision import VisionEncoder, concept_cls
from xvlm.models.xvlm import XVLM
from xvlm.training.recipes import RECIPES, model_config

torch.set_num_threads(1)
TINY = ViTVisionConfig(image_res=64, patch_size=16, width=32, depth=1, num_heads=2)


def embed_change_per_patch(cfg: ViTVisionConfig) -> torch.Tensor:
    """How much each patch's embedding moves when one pixel at the right edge of patch (0, 0) changes."""
    torch.manual_seed(0)
    encoder = VisionEncoder(cfg).eval()
    image = torch.randn(1, 3, cfg.image_res, cfg.image_res)
    moved = image.clone()
    moved[0, :, 5, cfg.patch_size - 1] += 3.0
    with torch.no_grad():
        a, b = (encoder.backbone.patch_embed(x) for x in (image, moved))
    return (a - b).abs().amax(dim=-1)[0]          # [patches]


def test_patchify_sees_one_patch_the_conv_stem_its_neighbours_too():
    patch = embed_change_per_patch(TINY)
    assert patch[0] > 0 and torch.count_nonzero(patch) == 1
    conv = embed_change_per_patch(dataclasses.replace(TINY, stem="conv"))
    assert conv[0] > 0 and conv[1] > 0            # the 3x3 kernels straddle the border to the right-hand patch
    far = [2, 2 * TINY.grid_size]                 # two patches right / down: outside the 31-pixel receptive field
    assert torch.count_nonzero(conv[far]) == 0


def test_conv_stem_gives_the_same_token_layout():
    encoder = VisionEncoder(dataclasses.replace(TINY, stem="conv")).eval()
    with torch.no_grad():
        tokens = encoder(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + TINY.grid_size ** 2, TINY.width)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("change, message", [({"stem": "resnet"}, "unknown vision stem"),
                                             ({"stem": "conv", "patch_size": 12}, "power-of-two")])
def test_bad_stem_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        VisionEncoder(dataclasses.replace(TINY, **change))


def test_configs_saved_before_the_stem_option_load_as_patchify():
    saved = XVLMConfig(vision=TINY).to_dict()
    del saved["vision"]["stem"]
    assert XVLMConfig.from_dict(saved).vision.stem == "patch"


def test_conv_stem_model_round_trips_with_its_batchnorm_statistics(tmp_path):
    cfg = model_config(RECIPES["shapes-tiny"])
    assert cfg.vision.stem == "conv"              # the tiny recipe trains the same stem as the default model
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=50))
    torch.manual_seed(0)
    model = XVLM(cfg)
    model.train()
    with torch.no_grad():                         # a training-mode pass moves the BatchNorm running statistics
        model.vision_encoder(torch.randn(4, 3, 64, 64) * 2 + 1)
    model.eval()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.cfg.vision.stem == "conv"
    stats = [k for k in model.state_dict() if k.endswith("running_mean")]
    assert stats and all(torch.equal(loaded.state_dict()[k], model.state_dict()[k]) for k in stats)
    assert not torch.equal(model.state_dict()[stats[0]], torch.zeros_like(model.state_dict()[stats[0]]))
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.vision_encoder(image), model.vision_encoder(image))


def test_concept_pooling_is_the_mean_of_each_concepts_patches_on_its_own_image():
    """Pooling against its definition, values and gradients, with concepts of uneven count per image."""
    torch.manual_seed(0)
    tokens = torch.randn(3, 1 + 16, 8, requires_grad=True)
    index = torch.tensor([2, 0, 2, 2, 1, 0])                      # uneven groups, out of order
    mask = (torch.rand(6, 1 + 16) < 0.4).float()
    mask[:, 1] = 1.0                                                 # at least one patch each
    pooled = concept_cls(tokens, mask, index)
    expected = torch.stack([tokens[i, 1:][mask[p, 1:].bool()].mean(0) for p, i in enumerate(index.tolist())])
    torch.testing.assert_close(pooled, expected)
    grad_out = torch.randn_like(pooled)
    (got,) = torch.autograd.grad(pooled, tokens, grad_out)
    (want,) = torch.autograd.grad(expected, tokens, grad_out)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(concept_cls(tokens, mask[:3]), torch.stack(        # no index: concept p on image p
        [tokens[p, 1:][mask[p, 1:].bool()].mean(0) for p in range(3)]))


def test_vit_positions_start_as_sincos_and_train_only_where_the_encoder_does():
    """The table is a starting point, not a constant: stages that train the encoder train it (as for every shipped
    model), the fusion-only stage leaves it (and the ITC heatmaps) as they are."""
    from xvlm.models.vision import sincos_2d
    from xvlm.training.loop import set_trainable
    recipe = RECIPES["shapes-tiny"]
    cfg = model_config(recipe)
    model = XVLM(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=40)))
    table = model.vision_encoder.backbone.pos_embed
    grid, width = cfg.vision.grid_size, cfg.vision.width
    assert torch.equal(table[0], sincos_2d(grid, width))
    assert {stage.trainable for stage in recipe.stages} == {"all", "fusion"}
    for stage in recipe.stages:
        set_trainable(model, stage)
        assert table.requires_grad == (stage.trainable == "all")
