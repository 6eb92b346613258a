"""nnU-Net's planned encoder/decoder as DSM's pixel-feature extractor.

The plans name a dynamic_network_architectures U-Net (PlainConvUNet, ResidualEncoderUNet, ...) and its kwargs;
nnU-Net builds it with ``get_network_from_plans``. DSM keeps its encoder and decoder but not its 1×1 segmentation
heads (DSM predicts masks from queries instead), and returns what the DSM decoders read: the encoder stage outputs
(multi-scale features, DSM's F_l) and the last decoder feature map (the high-resolution pixel embedding input).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

NUM_KMMM_SCALES = 4


class PlansError(ValueError):
    """The plans describe a network DSM cannot use; the message says what and how to fix it."""


class UNetFeatures(nn.Module):
    """Encoder + decoder of an nnU-Net U-Net; ``forward(x) -> (encoder_outputs, last_decoder_feature)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        encoder, decoder = getattr(unet, "encoder", None), getattr(unet, "decoder", None)
        if encoder is None or decoder is None or not hasattr(decoder, "stages") or not hasattr(decoder, "transpconvs"):
            raise PlansError(f"{type(unet).__name__} is not an encoder/decoder U-Net of dynamic_network_architectures "
                             f"(needs .encoder and .decoder.stages/.transpconvs); DSM needs a U-Net backbone such as "
                             f"PlainConvUNet or ResidualEncoderUNet in the plans.")
        self.encoder = encoder
        self.decoder_stages = decoder.stages
        self.decoder_transpconvs = decoder.transpconvs
        if hasattr(self.encoder, "return_skips"):
            self.encoder.return_skips = True
        self.encoder_channels: List[int] = list(encoder.output_channels)
        self.decoder_channels: int = self.encoder_channels[0]

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        skips = self.encoder(x)
        lres = skips[-1]
        for s, (up, stage) in enumerate(zip(self.decoder_transpconvs, self.decoder_stages)):
            lres = stage(torch.cat((up(lres), skips[-(s + 2)]), 1))
        return skips, lres


def build_unet_features(configuration_manager, num_input_channels: int) -> UNetFeatures:
    """Build the planned U-Net with nnU-Net's own helper and wrap it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    unet = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels, 1, allow_init=True, deep_supervision=False)
    return UNetFeatures(unet)


def kmmm_stage_indices(n_stages: int) -> List[int]:
    """Encoder stages the four kMMM layers read, coarse → fine: the four coarsest (paper §5.3, output strides
    32, 16, 8, 4 on a six-stage encoder)."""
    if n_stages < NUM_KMMM_SCALES:
        raise PlansError(
            f"the planned network has {n_stages} resolution stages; DSM's kMMM decoder needs at least "
            f"{NUM_KMMM_SCALES} (one kMMM layer per scale). Plan with a larger patch size (e.g. "
            f"nnUNetv2_plan_and_preprocess ... -overwrite_target_spacing / a custom planner) so that nnU-Net "
            f"creates four or more stages.")
    return list(range(n_stages - 1, n_stages - 1 - NUM_KMMM_SCALES, -1))


def stage_scales(strides: Sequence[Sequence[int]]) -> List[List[float]]:
    """Per encoder stage, its resolution relative to the input (1 / cumulative stride), per axis."""
    return [list(1.0 / c) for c in np.cumprod(np.vstack(strides), axis=0)]
