"""What every timed section builds on: the real trainer classes set up as ``initialize()`` does, synthetic
training batches and text embeddings, and the timing helpers (CUDA synchronisation, rotating order, medians,
releasing memory between timed calls)."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import io
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2
from nnunetv2_dsm.training.stage1_teacher import Stage1Teacher

from .plans import CASE_ID


# ------------------------------------------------------------------------------------------ trainers and batches
def trainer_class(name: str):
    """The trainer class of a benchmarked network name (nnunet, dsm_stage1, dsm_stage2)."""
    return {"nnunet": nnUNetTrainer, "dsm_stage1": nnUNetTrainerDSMStage1, "dsm_stage2": nnUNetTrainerDSMStage2}[name]


def text_embeddings(seed: int = 0) -> torch.Tensor:
    """Seeded random unit vectors in place of the 45 CLIP class embeddings (timing does not need real ones)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(45, 512, generator=g), dim=-1)


def num_input_channels(setup: Dict) -> int:
    return len(setup["dataset_json"]["channel_names"])


def make_trainer(name: str, setup: Dict):
    """The trainer, set up as nnUNetTrainer.initialize() does it (minus the dataset and torch.compile)."""
    cls = trainer_class(name)
    plans = copy.deepcopy(setup["plans"])
    plans["continue_training"] = False
    device = torch.device(setup["device"])
    torch.manual_seed(setup["seed"])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = cls(plans, setup["configuration"], 0, copy.deepcopy(setup["dataset_json"]), device=device)
    n_in = num_input_channels(setup)
    trainer.num_input_channels = n_in
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, n_in,
                                                         trainer.label_manager.num_segmentation_heads,
                                                         trainer.enable_deep_supervision).to(device)
    if name == "dsm_stage2":
        trainer.network.alignment.set_text_embeddings(text_embeddings(setup["seed"]))
        if trainer.stage1_distillation:   # its step runs the frozen Stage 1 teacher too (random weights here)
            stage1 = trainer.build_dsm_network(trainer.configuration_manager, n_in, stage=1)
            trainer.teacher = Stage1Teacher(stage1, stage1.state_dict(), device)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.network.train()
    return trainer


def make_batch(trainer, setup: Dict, seed: int) -> Dict:
    """A training batch like nnU-Net's data loader gives it: data (B, C, *patch), one bool region target per deep
    supervision scale (rounded as DownsampleSegForDSTransform does), the case keys."""
    configuration_manager = trainer.configuration_manager
    bs, patch = configuration_manager.batch_size, list(configuration_manager.patch_size)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((bs, num_input_channels(setup), *patch), generator=g)
    heads = trainer.label_manager.num_segmentation_heads
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(patch)]
    target = [torch.rand((bs, heads, *[round(p * s) for p, s in zip(patch, sc)]), generator=g) > 0.9
              for sc in scales]
    if len(target) == 1 and not trainer.enable_deep_supervision:
        target = target[0]
    return {"data": data, "target": target, "keys": np.array([CASE_ID] * bs)}


def release_memory(device: str = "cpu") -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc malloc_trim) between timed calls, so one
    network's freed activations do not stay resident, fragmented, under the next one (outside the timings)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rotated(names: Sequence[str], r: int) -> List[str]:
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


def stats(values: Sequence[float]) -> Dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}
