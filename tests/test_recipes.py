"""The original's recipes, as this package's flags produce them, against values derived from the original's definitions.

Each expected value is written out here from the original research code's definitions (its README's recipes, its
main_*.py, util/lr_sched.py, util/lr_decay.py, util/lars.py, util/datasets.py, util/crop.py, util/pos_embed.py) and the
published numbers in the MAE paper, never computed by this package's own code.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from timm.optim import Lars, param_groups_weight_decay
from torchvision import transforms

import main_finetune
import main_linprobe
import main_pretrain
from util import lr_sched
from util.checkpoint import load_pretrained
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, build_transform
from util.lr_decay import param_groups_layer_decay
from util.runtime import build_model

BICUBIC = transforms.InterpolationMode.BICUBIC

# The original's README commands: per-GPU batch, nodes x GPUs, and the flags that differ from the defaults.
PRETRAIN = ["--batch_size", "64", "--model", "mae_vit_large_patch16", "--norm_pix_loss", "--mask_ratio", "0.75",
            "--epochs", "800", "--warmup_epochs", "40", "--blr", "1.5e-4", "--weight_decay", "0.05"]
FINETUNE = {  # 4 nodes x 8 GPUs x batch 32 = 1024
    "base": ["--batch_size", "32", "--model", "vit_base_patch16", "--epochs", "100", "--blr", "5e-4",
             "--layer_decay", "0.65", "--weight_decay", "0.05", "--drop_path", "0.1", "--mixup", "0.8",
             "--cutmix", "1.0", "--reprob", "0.25", "--dist_eval"],
    "large": ["--batch_size", "32", "--model", "vit_large_patch16", "--epochs", "50", "--blr", "1e-3",
              "--layer_decay", "0.75", "--weight_decay", "0.05", "--drop_path", "0.2", "--mixup", "0.8",
              "--cutmix", "1.0", "--reprob", "0.25", "--dist_eval"],
    "huge": ["--batch_size", "32", "--model", "vit_huge_patch14", "--epochs", "50", "--blr", "1e-3",
             "--layer_decay", "0.75", "--weight_decay", "0.05", "--drop_path", "0.3", "--mixup", "0.8",
             "--cutmix", "1.0", "--reprob", "0.25", "--dist_eval"],
}
LINPROBE = ["--batch_size", "512", "--model", "vit_base_patch16", "--cls_token", "--epochs", "90", "--blr", "0.1",
            "--weight_decay", "0.0", "--dist_eval"]  # 4 nodes x 8 GPUs x 512 = 16384


def parse(module, argv, world_size):
    args = module.get_args_parser().parse_args([*argv, "--data_path", "unused"])
    lr_sched.set_effective_lr(args, world_size)
    return args


# ------------------------------------------------------------------ learning rate and schedule
@pytest.mark.parametrize("module,argv,world,lr,warmup,min_lr", [
    (main_pretrain, PRETRAIN, 64, 1.5e-4 * 4096 / 256, 40, 0.0),  # 8 nodes x 8 GPUs x 64 = 4096
    (main_finetune, FINETUNE["base"], 32, 5e-4 * 1024 / 256, 5, 1e-6),
    (main_finetune, FINETUNE["large"], 32, 1e-3 * 1024 / 256, 5, 1e-6),
    (main_finetune, FINETUNE["huge"], 32, 1e-3 * 1024 / 256, 5, 1e-6),
    (main_linprobe, LINPROBE, 32, 0.1 * 16384 / 256, 10, 0.0),
])
def test_effective_lr_warmup_and_half_cycle_cosine(module, argv, world, lr, warmup, min_lr):
    args = parse(module, argv, world)
    assert args.lr == pytest.approx(lr, rel=1e-12)
    assert (args.warmup_epochs, args.min_lr) == (warmup, min_lr)
    # the original's lr_sched.adjust_learning_rate: linear warmup from 0, then min_lr + (lr - min_lr) * half cosine
    for epoch in (0.0, warmup / 2, warmup, (warmup + args.epochs) / 2, args.epochs * 0.9, args.epochs):
        if epoch < warmup:
            expected = lr * epoch / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (args.epochs - warmup)))
        assert lr_sched.lr_at(epoch, args) == pytest.approx(expected, rel=1e-9, abs=1e-15), epoch


def test_pretraining_recipe_flags():
    args = parse(main_pretrain, PRETRAIN, 64)
    assert (args.mask_ratio, args.norm_pix_loss, args.weight_decay, args.input_size) == (0.75, True, 0.05, 224)


# ------------------------------------------------------------------ transforms
def test_pretraining_transform_is_random_resized_crop_scale_02_and_flip():
    crop, flip, to_tensor, normalize = build_transform("pretrain", parse(main_pretrain, PRETRAIN, 64)).transforms
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.2, 1.0), BICUBIC)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, transforms.ToTensor)
    assert (tuple(normalize.mean), tuple(normalize.std)) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_finetuning_train_transform_is_timms_randaugment_recipe(size):
    steps = build_transform("finetune", parse(main_finetune, FINETUNE[size], 32)).transforms
    crop, flip, augment = steps[:3]
    # timm's create_transform(is_training=True): RandomResizedCrop(scale 0.08-1, bicubic), flip, RandAugment
    assert (crop.size, crop.scale) == ((224, 224), (0.08, 1.0))
    assert "bicubic" in str(crop.interpolation).lower()
    assert type(flip).__name__ == "RandomHorizontalFlip"
    assert type(augment).__name__ == "RandAugment"
    # rand-m9-mstd0.5-inc1: 2 ops per image, magnitude 9 with std 0.5, the "increasing" op set
    assert augment.num_layers == 2
    assert {op.magnitude for op in augment.ops} == {9} and {op.magnitude_std for op in augment.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in augment.ops}
    erasing = steps[-1]
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)


@pytest.mark.parametrize("input_size,resize", [(224, 256), (448, 448), (384, 384)])
def test_evaluation_transform_crop_pct(input_size, resize):
    """crop_pct 224/256 up to 224 px, 1.0 above (the original's build_transform)."""
    args = parse(main_finetune, [*FINETUNE["huge"], "--input_size", str(input_size)], 32)
    resize_step, crop, *_ = build_transform("eval", args).transforms
    assert isinstance(resize_step, transforms.Resize) and resize_step.size == resize
    assert resize_step.interpolation == BICUBIC
    assert crop.size == (input_size, input_size)


def original_probe_crop_box(height, width, generator):
    """The original linear probe's RandomResizedCrop.get_params (util/crop.py): one draw, clamped, no retries."""
    area = height * width
    target_area = area * torch.empty(1).uniform_(0.08, 1.0, generator=generator).item()
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
    w = min(int(round(math.sqrt(target_area * ratio))), width)
    h = min(int(round(math.sqrt(target_area / ratio))), height)
    return h * w / area


def test_linear_probe_crop_has_the_originals_area_statistics():
    crop = build_transform("linprobe", parse(main_linprobe, LINPROBE, 32)).transforms[0]
    assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.08, 1.0), BICUBIC)
    image = torch.zeros(3, 375, 500, dtype=torch.uint8)
    torch.manual_seed(0)
    areas = torch.tensor([h * w / (375 * 500) for _, _, h, w in (crop.get_params(image, crop.scale, crop.ratio)
                                                                   for _ in range(4000))])
    generator = torch.Generator().manual_seed(0)
    reference = torch.tensor([original_probe_crop_box(375, 500, generator) for _ in range(4000)])
    # the original's crop on a 500 x 375 image: mean area 0.52, P(area > 0.7) 0.29 (torchvision's: 0.43, 0.13)
    assert areas.mean().item() == pytest.approx(reference.mean().item(), abs=0.02)
    assert (areas > 0.7).float().mean().item() == pytest.approx((reference > 0.7).float().mean().item(), abs=0.03)
    assert reference.mean().item() == pytest.approx(0.52, abs=0.02)


# ------------------------------------------------------------------ optimizer groups
def vit_base():
    with torch.device("meta"):
        return build_model("vit_base_patch16", global_pool=False)


@pytest.mark.parametrize("size,decay", [("base", 0.65), ("large", 0.75), ("huge", 0.75)])
def test_layer_decay_scale_of_every_parameter(size, decay):
    """The original's util/lr_decay.py: n = depth + 1; tokens, position table, patch embedding: decay^n; block k:
    decay^(n - k - 1); everything after the blocks (norm, fc_norm, head): 1. No weight decay on 1-D parameters,
    pos_embed and cls_token."""
    args = parse(main_finetune, FINETUNE[size], 32)
    assert args.layer_decay == decay
    for global_pool in (True, False):
        with torch.device("meta"):
            model = build_model(args.model, global_pool=global_pool)
        n = len(model.blocks) + 1
        groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)
        names = {id(p): name for name, p in model.named_parameters()}
        seen = {}
        for group in groups:
            for p in group["params"]:
                seen[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
        assert set(seen) == set(names.values())
        for name, (scale, weight_decay) in seen.items():
            if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
                expected = decay ** n
            elif name.startswith("blocks."):
                expected = decay ** (n - int(name.split(".")[1]) - 1)
            else:
                expected = 1.0
            assert scale == pytest.approx(expected, rel=1e-12), name
            no_decay = model.state_dict()[name].ndim == 1 or name in ("pos_embed", "cls_token")
            assert weight_decay == (0.0 if no_decay else 0.05), name
        if not global_pool:
            assert seen["norm.weight"][0] == 1.0  # the --cls_token classifier's final norm trains at the full lr


def test_drop_path_rises_linearly_to_the_recipes_rate():
    model = build_model("vit_tiny_patch16", drop_path_rate=0.1, depth=4)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]  # rate 0: an Identity
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # torch.linspace(0, rate, depth)


def test_pretraining_weight_decay_groups():
    """AdamW on 2-D weights with decay 0.05; norms and biases without. Tokens: see the README's differences."""
    model = build_model("mae_vit_tiny_patch4", img_size=32)
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert all(model.state_dict()[name].ndim > 1 for name in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert not decayed & {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "norm.weight", "norm.bias"}
    trained = {names[id(p)] for g in groups for p in g["params"]}
    assert "pos_embed" not in trained and "decoder_pos_embed" not in trained  # fixed sin-cos tables


def test_lars_step_equals_the_originals_rule():
    """The original's util/lars.py at the recipe's weight decay 0: for a matrix, dp = g scaled by the trust ratio
    0.001 * |w| / |g|; vectors are not adapted; then heavy-ball momentum 0.9 and w -= lr * mu."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 3))
    optimizer = Lars(main_linprobe.lars_param_groups(head, 0.0), lr=6.4, momentum=0.9, trust_coeff=0.001, eps=0.0)
    weight, bias = head[1].weight.detach().clone(), head[1].bias.detach().clone()
    momentum_w, momentum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(16, 8)).square().sum().backward()
        grad_w, grad_b = head[1].weight.grad, head[1].bias.grad
        dp_w = grad_w * (0.001 * weight.norm() / grad_w.norm())
        momentum_w = momentum_w * 0.9 + dp_w
        momentum_b = momentum_b * 0.9 + grad_b
        weight, bias = weight - 6.4 * momentum_w, bias - 6.4 * momentum_b
        optimizer.step()
        assert torch.allclose(head[1].weight, weight, atol=1e-6) and torch.allclose(head[1].bias, bias, atol=1e-6)


# ------------------------------------------------------------------ heads and position tables
@pytest.mark.parametrize("std", [2e-5, 0.01])
def test_new_head_is_trunc_normal_with_the_programs_std(tmp_path, std):
    encoder = build_model("mae_vit_tiny_patch4", img_size=32)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": state}, tmp_path / "encoder.pth")
    classifier = build_model("vit_tiny_patch4", img_size=32, num_classes=1000)
    load_pretrained(classifier, tmp_path / "encoder.pth", head_init_std=std, log=None)
    weight = classifier.head.weight
    # timm's trunc_normal_ cuts at +-2 absolute, far outside these stds: the spread is the std itself
    assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(classifier.head.bias, torch.zeros(1000))


def test_position_table_resampled_for_huge_at_448_as_the_original(tmp_path):
    """224 px -> 448 px with 14-px patches: 16x16 -> 32x32, F.interpolate(bicubic, align_corners=False), cls row kept."""
    source = build_model("vit_huge_patch14", img_size=224, embed_dim=32, depth=1, num_heads=2)
    torch.nn.init.normal_(source.pos_embed)
    torch.save({"model": source.state_dict()}, tmp_path / "h224.pth")
    target = build_model("vit_huge_patch14", img_size=448, embed_dim=32, depth=1, num_heads=2)
    load_pretrained(target, tmp_path / "h224.pth", log=None)
    table = source.pos_embed.detach()
    grid = table[:, 1:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 1024, 32)], dim=1)
    assert torch.allclose(target.pos_embed, expected, atol=1e-6)


def test_from_scratch_class_token_is_trunc_normal_002_as_the_original():
    """The original's ViT (timm 0.3.2) drew the class token trunc-normal(0.02); timm 1.x draws normal(1e-6)."""
    torch.manual_seed(0)
    tokens = torch.cat([build_model("vit_base_patch16", depth=1).cls_token.flatten() for _ in range(4)])
    assert tokens.std().item() == pytest.approx(0.02, rel=0.1) and tokens.abs().max().item() <= 2.0


def test_a_classifier_without_class_token_still_builds():
    model = build_model("vit_tiny_patch16", class_token=False, global_pool=True, depth=1)
    assert model.cls_token is None and model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
