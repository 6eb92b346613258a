"""Shared helpers for the DSM network/trainer tests: a small planned configuration and its network."""
from __future__ import annotations

import torch

from nnunetv2_dsm.network.backbone import UNetFeatures
from nnunetv2_dsm.network.dsm import TINY_ARCHITECTURE, DSMNetwork


def plain_unet_kwargs(n_stages: int = 4, ndim: int = 3, base: int = 8):
    conv = "torch.nn.modules.conv.Conv3d" if ndim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = "torch.nn.modules.instancenorm.InstanceNorm3d" if ndim == 3 else "torch.nn.modules.instancenorm.InstanceNorm2d"
    return {
        "n_stages": n_stages,
        "features_per_stage": [min(base * 2 ** i, 64) for i in range(n_stages)],
        "conv_op": conv,
        "kernel_sizes": [[3] * ndim] * n_stages,
        "strides": [[1] * ndim] + [[2] * ndim] * (n_stages - 1),
        "n_conv_per_stage": [1] * n_stages,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def build_backbone(n_stages: int = 4, ndim: int = 3, base: int = 8) -> UNetFeatures:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    kw = plain_unet_kwargs(n_stages, ndim, base)
    unet = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kw,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 1, deep_supervision=False)
    return UNetFeatures(unet)


def tiny_network(stage: int, n_stages: int = 4, ndim: int = 3, seed: int = 0) -> DSMNetwork:
    torch.manual_seed(seed)
    return DSMNetwork(build_backbone(n_stages, ndim), stage, TINY_ARCHITECTURE, ndim=ndim)


def params_without_gradient(net: DSMNetwork, train_steps: int = 1, tumors: bool = False, seed: int = 1,
                            size: int = 32, ndim: int = 3) -> list:
    """Names of the trainable parameters whose gradient is missing or zero after ``train_steps`` forward/backward
    passes of the DSM loss on random multi-hot targets (every class annotated; organs only unless ``tumors``),
    with an AdamW step between passes. The one check behind the "every parameter trains" tests of both stages."""
    from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS
    from nnunetv2_dsm.training.loss import DSMLoss
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *[size] * ndim, generator=g)
    annotated = torch.ones(2, NUM_CLASSES, dtype=torch.bool)
    annotated[:, NUM_ORGANS:] = tumors
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    for step in range(train_steps):
        opt.zero_grad()
        out = net(x)
        targets = [torch.rand((2, NUM_CLASSES, *o.shape[2:]), generator=g) > 0.7 for o in out.predictions()]
        DSMLoss(len(targets))(out, targets, annotated).backward()
        if step < train_steps - 1:
            opt.step()
    return missing_gradients(net)


def missing_gradients(module: torch.nn.Module) -> list:
    """Names of ``module``'s trainable parameters whose gradient is missing or zero (after a backward pass)."""
    return [name for name, param in module.named_parameters()
            if param.requires_grad and (param.grad is None or not param.grad.abs().sum() > 0)]
