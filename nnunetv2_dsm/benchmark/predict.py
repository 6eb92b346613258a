"""Sliding-window prediction of one volume with ``nnUNetPredictor`` for every network, timed in rotating
rounds."""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import statistics
from typing import Dict, List, Sequence

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from .plans import LABELS, log
from .runner import num_input_channels, release_memory, rotated, stats, text_embeddings, timed, trainer_class


# ------------------------------------------------------------------------------------------------------ predict
def default_volume(setup: Dict) -> List[int]:
    """A 256×256×160 CT in the plans' axes: 160 along the axis of largest spacing, 256 along the others."""
    cfg = setup["plans"]["configurations"][setup["configuration"]]
    spacing = list(cfg["spacing"])
    if len(spacing) != 3:
        return [256] * len(spacing)
    vol = [256, 256, 256]
    vol[int(np.argmax(spacing))] = 160
    return vol


def bench_predict(setup: Dict, names: Sequence[str], volume: Sequence[int], warmup: int, reps: int,
                  mirroring: bool) -> Dict:
    """Sliding-window prediction of one random ``volume`` per network (nnU-Net's predictor, Gaussian weighting,
    step 0.5): median seconds and seconds per tile."""
    device = setup["device"]
    plans_manager = PlansManager(copy.deepcopy(setup["plans"]))
    configuration_manager = plans_manager.get_configuration(setup["configuration"])
    n_in = num_input_channels(setup)
    heads = plans_manager.get_label_manager(setup["dataset_json"]).num_segmentation_heads
    mirror_axes = tuple(range(len(configuration_manager.patch_size))) if mirroring else None
    predictors = {}
    for n in names:
        log(f"predict: building {LABELS[n]} for inference")
        cls = trainer_class(n)
        torch.manual_seed(setup["seed"])
        net = cls.build_network_architecture(plans_manager, configuration_manager, n_in, heads, False)
        net = net.to(torch.device(device))
        if n == "dsm_stage2":   # nnU-Net's predictor gets DSM's logits view (output.PredictionNetwork)
            net.network.alignment.set_text_embeddings(text_embeddings(setup["seed"]).to(device))
        net.eval()
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                        perform_everything_on_device=device == "cuda", device=torch.device(device),
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.manual_initialization(net, plans_manager, configuration_manager, [net.state_dict()],
                                            setup["dataset_json"], cls.__name__, mirror_axes)
        predictors[n] = predictor
    g = torch.Generator().manual_seed(setup["seed"])
    image = torch.randn((n_in, *volume), generator=g)
    padded = [max(size, tile) for size, tile in zip(volume, configuration_manager.patch_size)]
    tiles = len(next(iter(predictors.values()))._internal_get_sliding_window_slicers(padded))
    patch = torch.randn((1, n_in, *configuration_manager.patch_size), generator=g).to(device)
    for n in names:  # warm-up: one patch forward each (and, with warmup > 1, whole volumes)
        with torch.inference_mode():
            timed(lambda: predictors[n].network(patch), device)
    times = {n: [] for n in names}
    for r in range(max(warmup - 1, 0) + reps):
        for n in rotated(names, r):
            release_memory(device)
            t = timed(lambda: predictors[n].predict_sliding_window_return_logits(image), device)
            if r >= max(warmup - 1, 0):
                times[n].append(t)
            log(f"predict: {'rep' if r >= max(warmup - 1, 0) else 'warm-up'} {LABELS[n]}: {t:.2f} s ({tiles} tiles)")
    del predictors
    gc.collect()
    return {"volume": list(volume), "tiles": tiles, "step_size": 0.5, "gaussian": True, "mirroring": mirroring,
            "networks": {n: {"seconds": stats(times[n]), "seconds_per_tile": statistics.median(times[n]) / tiles}
                         for n in names}}
