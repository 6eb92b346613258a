"""The DSM trainers' shared base: a thin ``nnUNetTrainer`` subclass that overrides nnU-Net's hooks only.

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDSMStage1
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDSMStage2      # starts from the Stage 1 checkpoint

Hook by hook: ``build_network_architecture`` builds the DSM network around the planned U-Net (for nnU-Net's
predictor, wrapped in ``network.output.PredictionNetwork``; ``build_dsm_network`` builds it for any stage, e.g.
Stage 2's frozen Stage 1 teacher); ``_get_deep_supervision_scales`` lists one target
resolution per kMMM layer; ``_build_loss`` is the partial-label Dice+BCE (global normalisation under DDP);
``train_step`` gives the loss the batch's annotated classes (manifest lookup by ``batch['keys']``) and runs
nnU-Net's own step; ``validation_step`` counts pseudo-Dice on annotated classes only; ``do_split`` keeps nnU-Net's
split but only the stage's training cases; ``configure_optimizers`` is AdamW (paper §5.3) with nnU-Net's poly
schedule; ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` drops left–right mirroring;
``perform_actual_validation`` runs nnU-Net's validation on the prediction view of the network, then rewrites
``validation/summary.json`` on annotated classes.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunetv2_dsm.evaluation.evaluate import evaluate_folder, format_table
from nnunetv2_dsm.evaluation.nnunet_summary import write_validation_summary
from nnunetv2_dsm.labels import CLASS_NAMES, NUM_CLASSES, NUM_ORGANS, ORGAN_NAMES
from nnunetv2_dsm.manifest import load_manifest
from nnunetv2_dsm.network.backbone import PlansError, build_unet_features, kmmm_stage_indices, stage_scales
from nnunetv2_dsm.network.dsm import DSMArchitecture, DSMNetwork
from nnunetv2_dsm.network.output import PredictionNetwork, label_table_logits
from nnunetv2_dsm.network.ssm_backend import backend_description
from nnunetv2_dsm.training.distributed import global_pair_normalizer
from nnunetv2_dsm.training.loss import DSMLoss, masked_tp_fp_fn
from nnunetv2_dsm.training.synthetic_lesions import (LESION_CONTRAST_HU, LESION_RADIUS_MM, add_synthetic_lesions,
                                                     ct_contrast_scale)


def left_right_axis(transpose_forward, patch_dims: int) -> Optional[int]:
    """The patch axis along the patient's left–right direction, or None (a 2-D configuration slicing across it).

    Images reach nnU-Net as SimpleITK arrays (z, y, x) of LPS volumes (the converters reorient to LPS, prediction
    too), so left–right is array axis 2; preprocessing permutes the axes by ``transpose_forward``, and a 2-D
    configuration's patches are the last two preprocessed axes."""
    axis = list(transpose_forward).index(2) - (3 - patch_dims)
    return axis if axis >= 0 else None


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The DSMNetwork inside DDP and/or torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


class nnUNetTrainerDSMBase(nnUNetTrainer):
    """Shared by both stages. Not meant to be trained directly: use nnUNetTrainerDSMStage1 / ...Stage2."""
    dsm_stage = 1
    dsm_architecture = DSMArchitecture()
    synthetic_lesion_probability = 0.0   # per case and step; 0 turns the augmentation off (Stage 2 turns it on)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4      # AdamW as in the paper (§5.3) and the official code
        self.weight_decay = 1e-5
        where = os.path.join(self.preprocessed_dataset_folder_base or "<nnUNet_preprocessed>/<dataset>", "dataset.json")
        self.manifest = load_manifest(dataset_json, where=where)
        self._lesion_rng: Optional[np.random.Generator] = None
        self._lesion_scale: Optional[float] = None

    # ---- network -------------------------------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """The DSM network (returns ``DSMOutput``); nnU-Net's predictor builds it with ``enable_deep_supervision``
        False and gets the logits view ``PredictionNetwork`` (same state dict). Inference calls this too
        (nnUNetv2_predict finds the trainer by name): it may only use its arguments."""
        if num_output_channels != NUM_CLASSES:
            raise PlansError(
                f"the dataset declares {num_output_channels} segmentation outputs but DSM predicts the {NUM_CLASSES} "
                f"classes of nnunetv2_dsm.labels. Build dataset.json with nnUNetv2_dsm_convert / nnUNetv2_dsm_merge "
                f"(labels = nnunetv2_dsm.labels.dataset_json_labels(), regions_class_order = "
                f"nnunetv2_dsm.labels.regions_class_order()).")
        network = cls.build_dsm_network(configuration_manager, num_input_channels, cls.dsm_stage)
        return network if enable_deep_supervision else PredictionNetwork(network)

    @classmethod
    def build_dsm_network(cls, configuration_manager, num_input_channels: int, stage: int) -> DSMNetwork:
        """The DSM network of ``stage`` on the planned U-Net, with this trainer's decoder widths."""
        arch = DSMArchitecture.from_plans(configuration_manager.configuration, cls.dsm_architecture)
        backbone = build_unet_features(configuration_manager, num_input_channels)
        return DSMNetwork(backbone, stage, arch, ndim=len(configuration_manager.patch_size))

    def _get_deep_supervision_scales(self):
        """Full resolution for the final masks, then each kMMM layer's own resolution, fine → coarse."""
        if not self.enable_deep_supervision:
            return None
        scales = stage_scales(self.configuration_manager.pool_op_kernel_sizes)
        return [[1.0] * len(scales[0])] + [scales[i] for i in kmmm_stage_indices(len(scales))[::-1]]

    def set_deep_supervision_enabled(self, enabled: bool):
        """Nothing to switch: the network always returns its per-layer predictions (``DSMOutput.layers``); the loss
        uses them when the targets carry one resolution per layer, and prediction goes through
        ``PredictionNetwork`` (see ``perform_actual_validation``)."""

    def _do_i_compile(self):
        # torch.compile only on explicit request (nnU-Net compiles by default) and on CUDA. The selective scan is
        # kept out of the graph (ssm_backend.run_scan), so the network compiles once, then runs without recompiling
        return self.device.type == "cuda" and os.environ.get("nnUNet_compile", "").lower() in ("1", "true", "t")

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's settings without mirroring along the patient's left–right axis, in augmentation and at test
        time: 8 classes are lateral (kidneys, adrenals, lungs, femur heads), and a mirrored CT puts the left kidney
        where the right one belongs (TotalSegmentator turns mirroring off for the same reason)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lateral = left_right_axis(self.plans_manager.transpose_forward, len(self.configuration_manager.patch_size))
        mirror_axes = tuple(a for a in (mirror_axes or ()) if a != lateral) or None
        self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _build_loss(self):
        n_outputs = 1 + len(kmmm_stage_indices(len(self.configuration_manager.pool_op_kernel_sizes))) \
            if self.enable_deep_supervision else 1
        # DDP averages the ranks' gradients: normalise by the annotated pairs of the global batch (distributed.py)
        return DSMLoss(n_outputs, alignment_weight=1.0 if self.dsm_stage == 2 else 0.0,
                       normalizer=global_pair_normalizer if self.is_ddp else None)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.initial_lr)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- data ----------------------------------------------------------------------------------------------------
    def do_split(self):
        """nnU-Net's split (splits_final.json or its seeded 5-fold CV), restricted to this stage's training cases:
        Stage 1 the organ datasets, Stage 2 those plus the tumor datasets (manifest ``stage``)."""
        tr_keys, val_keys = super().do_split()
        allowed = set(self.manifest.training_cases(self.dsm_stage))
        tr = [k for k in tr_keys if k in allowed]
        val = [k for k in val_keys if k in allowed]
        dropped = len(tr_keys) + len(val_keys) - len(tr) - len(val)
        self.print_to_log_file(f"DSM Stage {self.dsm_stage}: {len(tr)} training / {len(val)} validation cases "
                               f"({dropped} cases of other stages or subsets left out)")
        self.dsm_training_keys = tr
        if not tr or not val:
            raise RuntimeError(f"fold {self.fold} has no Stage {self.dsm_stage} training or validation cases. "
                               f"Sources by case count: {self.manifest.sources()}. Stage 1 trains on the organ "
                               f"datasets of the manifest (stage 1); Stage 2 adds stage-2 sources.")
        return tr, val

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(backend_description(self.device))
        if self._do_i_compile():
            self.print_to_log_file(
                "nnUNet_compile=1: the first training step compiles the DSM network with Inductor, one graph per "
                "kMMM layer scale; on an H200 a narrow Stage 2 network had not finished compiling after 196 s "
                "(docs/performance.md, GPU). Unset nnUNet_compile to train uncompiled.")
        self.set_trained_classes()

    def set_trained_classes(self) -> None:
        """Record in the network (and so in the checkpoint) which classes this run's training cases annotate; at
        inference the others answer 'absent' (DSMNetwork.trained_classes)."""
        trained = self.annotated_classes(self.dsm_training_keys).any(0)
        unwrap(self.network).trained_classes.copy_(trained)
        missing = [CLASS_NAMES[i] for i in np.flatnonzero(~trained.cpu().numpy())]
        self.print_to_log_file(f"DSM Stage {self.dsm_stage}: {int(trained.sum())} classes annotated in the training "
                               f"cases; at inference these answer 'absent': {', '.join(missing) or 'none'}")

    def annotated_classes(self, keys) -> torch.Tensor:
        """(B, 45) bool on the device: the classes each case of the batch annotates (organs only in Stage 1)."""
        mask = self.manifest.annotated_mask([str(k) for k in keys])
        if self.dsm_stage == 1:
            mask[:, NUM_ORGANS:] = False
        return torch.from_numpy(mask).to(self.device)

    # ---- steps ---------------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step; the loss reads which classes each case of the batch annotates (partial labels), the batch
        first gets its synthetic lesions (``training/synthetic_lesions.py``), then ``prepare_loss`` sees it."""
        self.loss.annotated = self.annotated_classes(batch["keys"])
        batch = self.with_synthetic_lesions(batch)
        self.prepare_loss(batch)
        try:
            return super().train_step(batch)
        finally:
            self.release_loss()

    def prepare_loss(self, batch: dict) -> None:
        """Hook: give the loss what it needs of this (augmented) batch besides the targets (Stage 2: the teacher)."""

    def release_loss(self) -> None:
        """Hook: drop what ``prepare_loss`` gave the loss."""

    def with_synthetic_lesions(self, batch: dict) -> dict:
        """The batch with, in about half its cases, a synthetic lesion in every annotated tumour-hosting organ, the
        organ's target 0 there (``synthetic_lesions.add_synthetic_lesions``); unchanged when
        ``synthetic_lesion_probability`` is 0 or the configuration is not a single-channel CT. The generator is
        seeded from torch's seed at the first step (the benchmark's training seed), apart from nnU-Net's sampling."""
        if self.synthetic_lesion_probability <= 0:
            return batch
        if self._lesion_rng is None:
            self._lesion_scale = ct_contrast_scale(self.plans_manager, self.configuration_manager)
            self._lesion_rng = np.random.default_rng(torch.initial_seed() % 2 ** 63)
            if self._lesion_scale is None:
                what = "off (not a single-channel CT configuration)"
            else:
                lo, hi = (hu * self._lesion_scale for hu in LESION_CONTRAST_HU)
                what = (f"p = {self.synthetic_lesion_probability:g} per case, one per eligible organ, contrast "
                        f"{LESION_CONTRAST_HU} HU log-uniform = {lo:.3f}..{hi:.3f} normalised, "
                        f"radius {LESION_RADIUS_MM} mm")
            self.print_to_log_file("Synthetic lesions: " + what)
        if self._lesion_scale is None:
            return batch
        target = batch["target"]
        targets = target if isinstance(target, list) else [target]
        data, targets, _ = add_synthetic_lesions(
            batch["data"], targets, self.loss.annotated.cpu().numpy(), self._lesion_scale,
            self.configuration_manager.spacing, self._lesion_rng, self.synthetic_lesion_probability)
        return {**batch, "data": data, "target": targets if isinstance(target, list) else targets[0]}

    def validation_step(self, batch: dict) -> dict:
        """Loss and hard tp/fp/fn of the final masks (the label table's regions: organs with their tumors), counted
        only on the classes each case annotates (nnU-Net's pseudo-Dice would count every unannotated class a case
        shows as a false positive)."""
        annotated = self.loss.annotated = self.annotated_classes(batch["keys"])
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        with torch.no_grad(), (autocast(self.device.type) if self.device.type == "cuda" else dummy_context()):
            output = self.network(data)
            loss = self.loss(output, target)
        tp, fp, fn = masked_tp_fp_fn(label_table_logits(output.logits),
                                     target[0] if isinstance(target, list) else target, annotated)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    # ---- final validation ----------------------------------------------------------------------------------------
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation (sliding-window prediction of the fold's validation cases) on the prediction view of
        the network (``PredictionNetwork`` around the module inside any DDP wrapper: prediction needs no gradient
        sync, and DDP's first forward broadcasts the DSM buffers, a collective that a rank without validation case
        never joins). Then the predictions are scored on each case's annotated classes only: validation/dsm/ and
        nnU-Net's validation/summary.json (which otherwise counts a predicted class that a partially labelled case
        does not annotate as a false positive)."""
        training_network = self.network
        self.network = PredictionNetwork(unwrap(training_network))
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.network = training_network
        if self.local_rank != 0 or self.preprocessed_dataset_folder_base is None:
            return
        validation = os.path.join(self.output_folder, "validation")
        summary = evaluate_folder(
            os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations"), validation,
            dataset_json=os.path.join(self.preprocessed_dataset_folder_base, "dataset.json"),
            classes=ORGAN_NAMES if self.dsm_stage == 1 else None, skip_missing=True, num_processes=1,
            output_dir=os.path.join(validation, "dsm"))
        write_validation_summary(validation, None, summary=summary)
        self.print_to_log_file("Validation on each case's annotated classes (partial labels; validation/summary.json, "
                               "DSM figures in validation/dsm/):\n" + format_table(summary))
