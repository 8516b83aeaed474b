"""The MAE model and the ViT classifier: masking, loss, patches, position tables, the original layout."""
import math

import numpy as np
import pytest
import timm
import torch

import models_mae
import models_vit
from util.pos_embed import sincos_2d


def tiny_mae(**kwargs):
    config = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    config.update(kwargs)
    return models_mae.MaskedAutoencoderViT(**config)


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (196, 0.75), (49, 0.75), (64, 0.5), (10, 0.33), (7, 0.0)])
def test_random_masking_keeps_exactly_int_l_times_one_minus_r(length, ratio):
    model = tiny_mae()
    x = torch.randn(3, length, 8)
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert x_masked.shape == (3, keep, 8)
    assert mask.shape == (3, length)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))


def test_ids_restore_inverts_the_shuffle_and_mask_agrees():
    model = tiny_mae()
    x = torch.randn(4, 20, 5)
    noise = torch.rand(4, 20)
    x_masked, mask, ids_restore = model.random_masking(x, 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    # un-shuffling the shuffled positions gives back 0..L-1
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(20).expand(4, -1))
    keep = int(20 * 0.25)
    for n in range(4):
        kept = set(torch.topk(noise[n], keep, largest=False).indices.tolist())
        # the kept tokens are the ones with the smallest noise, in order of increasing noise
        assert torch.equal(x_masked[n], x[n, ids_shuffle[n, :keep]])
        assert {i for i in range(20) if mask[n, i] == 0} == kept


def test_same_noise_gives_same_mask_and_loss():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss1, pred1, mask1 = model(imgs, 0.75, noise=noise)
    torch.manual_seed(123)  # a different global RNG state must not matter
    loss2, pred2, mask2 = model(imgs, 0.75, noise=noise)
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and loss1.item() == loss2.item()
    loss3, _, mask3 = model(imgs, 0.75)
    assert not torch.equal(mask1, mask3)


def hand_loss(imgs, pred, mask, patch, norm_pix):
    """The loss computed patch by patch from the image, independently of patchify."""
    n_imgs, chans, h, w = imgs.shape
    grid_w = w // patch
    total, count = 0.0, 0
    for n in range(n_imgs):
        for idx in range(mask.shape[1]):
            if mask[n, idx] == 0:
                continue
            r, c = divmod(idx, grid_w)
            block = imgs[n, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            target = block.permute(1, 2, 0).reshape(-1).double()  # channels last inside the patch
            if norm_pix:
                target = (target - target.mean()) / math.sqrt(target.var(unbiased=True).item() + 1e-6)
            total += ((pred[n, idx].double() - target) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_a_hand_computation(norm_pix):
    torch.manual_seed(1)
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 16, 16)
    loss, pred, mask = model(imgs, 0.75)
    assert loss.item() == pytest.approx(hand_loss(imgs, pred.detach(), mask, 4, norm_pix), rel=1e-5)


@pytest.mark.parametrize("chans", [1, 3])
def test_unpatchify_inverts_patchify(chans):
    model = tiny_mae(in_chans=chans)
    imgs = torch.randn(2, chans, 16, 16)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 4 * 4 * chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 5 = row 1, column 1; channels last inside the patch
    assert torch.equal(patches[0, 5], imgs[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))


def numpy_original_table(dim, grid):
    """The original formula, written out element by element."""
    table = np.zeros((grid * grid + 1, dim), dtype=np.float64)
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            token = 1 + row * grid + col
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                table[token, k] = np.sin(col * omega)
                table[token, quarter + k] = np.cos(col * omega)
                table[token, 2 * quarter + k] = np.sin(row * omega)
                table[token, 3 * quarter + k] = np.cos(row * omega)
    return table.astype(np.float32)


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 7), (768, 14)])
def test_position_tables_equal_the_original_formula(dim, grid):
    assert np.array_equal(sincos_2d(dim, grid, cls_token=True).astype(np.float32), numpy_original_table(dim, grid))


def test_model_position_tables_are_the_fixed_sincos_ones():
    model = tiny_mae()
    assert torch.equal(model.pos_embed[0], torch.from_numpy(numpy_original_table(32, 4)))
    assert torch.equal(model.decoder_pos_embed[0], torch.from_numpy(numpy_original_table(16, 4)))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def original_layout(dim, depth, dec_dim, dec_depth, patch, chans, tokens):
    """Names and shapes of the original research code's pretraining state dict, written out by hand."""
    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}
    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim), "mask_token": (1, 1, dec_dim),
              "decoder_pos_embed": (1, tokens, dec_dim), "patch_embed.proj.weight": (dim, chans, patch, patch),
              "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        layout.update(block(f"blocks.{i}", dim))
    layout.update({"norm.weight": (dim,), "norm.bias": (dim,), "decoder_embed.weight": (dec_dim, dim),
                   "decoder_embed.bias": (dec_dim,)})
    for i in range(dec_depth):
        layout.update(block(f"decoder_blocks.{i}", dec_dim))
    layout.update({"decoder_norm.weight": (dec_dim,), "decoder_norm.bias": (dec_dim,),
                   "decoder_pred.weight": (patch * patch * chans, dec_dim), "decoder_pred.bias": (patch * patch * chans,)})
    return layout


def test_a_state_dict_in_the_original_layout_loads_strictly():
    layout = original_layout(32, 2, 16, 1, 4, 3, 17)
    state = {k: torch.randn(shape) for k, shape in layout.items()}
    model = tiny_mae()
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.decoder_pred.weight, state["decoder_pred.weight"])


def test_timm_create_model_builds_vit_base_with_the_original_names_and_shapes():
    model = timm.create_model("mae_vit_base_patch16")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 254
    assert shapes == original_layout(768, 12, 512, 8, 16, 3, 197)


@pytest.mark.parametrize("name,patch,dim,depth", [("mae_vit_large_patch16", 16, 1024, 24), ("mae_vit_huge_patch14", 14, 1280, 32)])
def test_large_and_huge_have_the_original_shapes(name, patch, dim, depth):
    with torch.device("meta"):  # shapes only, no memory
        model = timm.create_model(name)
    tokens = (224 // patch) ** 2 + 1
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == original_layout(dim, depth, 512, 8, patch, 3, tokens)


def test_giant_encoder_and_classifier_count_as_timms_vit_giant_patch14_without_its_head():
    with torch.device("meta"):  # counts only, no memory
        reference = timm.create_model("vit_giant_patch14_224")
        mae = timm.create_model("mae_vit_giant_patch14")
        vit = timm.create_model("vit_giant_patch14", num_classes=0)
    count = lambda params: sum(p.numel() for p in params)
    expected = count(reference.parameters()) - count(reference.head.parameters())
    encoder = [p for name, p in mae.named_parameters() if not name.startswith(("decoder_", "mask_token"))]
    assert count(encoder) == expected
    assert count(vit.parameters()) == expected
    assert mae.decoder_embed.out_features == 512 and len(mae.decoder_blocks) == 8


@pytest.mark.parametrize("name,size,chans", [("mae_vit_tiny_patch2", 32, 3), ("mae_vit_tiny_patch4", 28, 1),
                                             ("mae_vit_tiny_patch16", 64, 3), ("mae_vit_small_patch16", 48, 3)])
def test_small_models_run_at_their_sizes(name, size, chans):
    model = timm.create_model(name, img_size=size, in_chans=chans, norm_pix_loss=True)
    imgs = torch.randn(2, chans, size, size)
    loss, pred, mask = model(imgs)
    patch = model.patch_size[0]
    assert pred.shape == (2, (size // patch) ** 2, patch * patch * chans)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_image_size_not_divisible_by_the_patch_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        timm.create_model("mae_vit_tiny_patch4", img_size=30)
    with pytest.raises(ValueError, match="not divisible"):
        timm.create_model("vit_tiny_patch4", img_size=30)


def test_original_method_signatures_compose():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    assert latent.shape == (2, 1 + 4, 32)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 48)
    assert model.forward_loss(imgs, pred, mask).ndim == 0


def test_vit_global_pool_is_mean_of_patch_tokens_then_fc_norm():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch4", img_size=16, num_classes=5, depth=2)
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(x)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_vit_cls_token_mode_uses_the_normed_class_token():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch4", img_size=16, num_classes=5, depth=2, global_pool=False)
    assert isinstance(model.fc_norm, torch.nn.Identity) and "norm.weight" in model.state_dict()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), model.head(model.forward_features(x)[:, 0]), atol=1e-6)


def test_every_mae_constructor_has_a_classifier_twin():
    mae_names = [n for n in timm.list_models("mae_vit_*")]
    assert len(mae_names) >= 7
    for name in mae_names:
        assert name[len("mae_"):] in timm.list_models("vit_*"), name


def test_a_target_changes_only_the_prediction_layer_and_adds_no_state():
    class Target:  # a generator of 108 values per patch, as HOG of 4-px patches with 2 cells would be
        dim, loss = 108, "cosine"

        def __call__(self, imgs):
            return torch.randn(imgs.shape[0], 16, 108)

    layout = original_layout(32, 2, 16, 1, 4, 3, 17)
    assert {k: tuple(v.shape) for k, v in tiny_mae().state_dict().items()} == layout
    model = tiny_mae()
    model.set_target(Target())
    layout.update({"decoder_pred.weight": (108, 16), "decoder_pred.bias": (108,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert model.target_loss == "cosine"
    loss, pred, _ = model(torch.randn(2, 3, 16, 16))
    assert pred.shape == (2, 16, 108) and torch.isfinite(loss)
