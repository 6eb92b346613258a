"""DSM Stage 2 (paper §4.2) and the Stage 1 → Stage 2 hand-over.

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDSMStage2

Stage 2 starts from the Stage 1 model of the same dataset, plans, configuration and fold. It is found by
convention at ``$nnUNet_results/<Dataset>/<Stage1 trainer>__<plans>__<configuration>/fold_<f>/checkpoint_final.pth``
or given explicitly with the environment variable ``nnUNet_dsm_stage1_checkpoint`` (a path to a .pth).
Every weight whose name and shape match is loaded (backbone, organ queries, kMMM layers, final head); the log
lists the modules Stage 2 adds (tumor queries, diffusion, prompt attention, alignment), which start fresh.
The CLIP class-prompt embeddings are read from the dataset's cache (``nnUNetv2_dsm_embed_prompts -d ID``).

The same Stage 1 checkpoint is also kept, frozen, as a teacher (``training/stage1_teacher.py``): on each organ a case
does not annotate (a LiTS case annotates only the liver), Stage 2 learns the Stage 1 model's probabilities
(``loss.stage1_distillation``), so what Stage 1 learned is not forgotten where no label speaks. It costs one Stage 1
forward pass per step; a resumed run (``--c``) loads the teacher again. A subclass with ``stage1_distillation =
False`` trains on the labels alone.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
from nnunetv2.paths import nnUNet_results

from nnunetv2_dsm.checkpoint import load_checkpoint   # weights_only=True: a crafted file runs no code
from nnunetv2_dsm.io_utils import atomic_save_json
from nnunetv2_dsm.labels import ORGAN_NAMES
from nnunetv2_dsm.text import load_class_embeddings
from nnunetv2_dsm.text.model_record import TEXT_INFO_FILE, record_text_in_dataset_json
from nnunetv2_dsm.training.nnUNetTrainerDSMBase import nnUNetTrainerDSMBase, unwrap
from nnunetv2_dsm.training.stage1_teacher import Stage1Teacher

STAGE1_CHECKPOINT_ENV = "nnUNet_dsm_stage1_checkpoint"


class Stage1CheckpointError(FileNotFoundError):
    pass


# Not weights: records of the run that wrote the checkpoint, which Stage 2 sets for itself (DSMNetwork.trained_classes)
RUN_RECORDS = frozenset({"trained_classes"})


def transfer_weights(network: torch.nn.Module, stage1_state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Load every tensor of ``stage1_state`` whose name and shape match into ``network`` (run records excepted).
    Returns (loaded keys, keys of ``network`` left at their initialisation)."""
    own = {k: v for k, v in network.state_dict().items() if k not in RUN_RECORDS}
    matched = {k: v for k, v in stage1_state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k in stage1_state if k in own and own[k].shape != stage1_state[k].shape)
    if mismatched:
        raise RuntimeError(f"Stage 1 weights do not fit the Stage 2 network (same plans and architecture "
                           f"needed): shape mismatch for {mismatched[:5]}")
    # the run records go in with their current values: a key missing from a loaded state dict is filled in by
    # DSMNetwork._load_from_state_dict (older checkpoints), which reset Stage 2's record to "every class trained"
    current = network.state_dict()
    network.load_state_dict({**matched, **{k: current[k] for k in RUN_RECORDS if k in current}}, strict=False)
    return sorted(matched), sorted(k for k in own if k not in matched)


def summarize_modules(keys: List[str]) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{m} ({n})" for m, n in sorted(counts.items()))


class nnUNetTrainerDSMStage2(nnUNetTrainerDSMBase):
    """DSM Stage 2: tumor queries with anomaly prompts, semantic diffusion, prompt-masked attention and CLIP
    class-prompt alignment, on the organ datasets plus the tumor datasets."""
    dsm_stage = 2
    stage1_trainer_name = "nnUNetTrainerDSMStage1"
    synthetic_lesion_probability = 0.5   # Eq. 14's organ channels learn tissue, not place (synthetic_lesions.py)
    stage1_distillation = True      # loss.stage1_distillation with the frozen Stage 1 model (False: labels only)
    teacher: Optional[Stage1Teacher] = None     # set in on_train_start (a trainer set up by hand has none)

    def stage1_checkpoint_path(self) -> str:
        explicit = os.environ.get(STAGE1_CHECKPOINT_ENV)
        if explicit:
            return explicit
        folder = f"{self.stage1_trainer_name}__{self.plans_manager.plans_name}__{self.configuration_name}"
        return os.path.join(os.fspath(nnUNet_results), self.plans_manager.dataset_name, folder,
                            f"fold_{self.fold}", "checkpoint_final.pth")

    def read_stage1(self) -> Tuple[str, Dict[str, torch.Tensor]]:
        """(path, network weights) of the Stage 1 checkpoint; a clear error when there is none."""
        path = self.stage1_checkpoint_path()
        if not os.path.isfile(path):
            raise Stage1CheckpointError(
                f"no Stage 1 checkpoint at {path}. Train Stage 1 first (nnUNetv2_train "
                f"{self.plans_manager.dataset_name} {self.configuration_name} {self.fold} -tr "
                f"{self.stage1_trainer_name} -p {self.plans_manager.plans_name}) or point "
                f"{STAGE1_CHECKPOINT_ENV} at a Stage 1 checkpoint_final.pth.")
        checkpoint = load_checkpoint(path, "Stage 1 checkpoint")
        if checkpoint.get("trainer_name", "").find("DSMStage1") < 0:
            self.print_to_log_file(f"WARNING: {path} was written by {checkpoint.get('trainer_name')}, "
                                   f"not a DSM Stage 1 trainer")
        return path, checkpoint["network_weights"]

    def load_stage1(self) -> None:
        path, weights = self.read_stage1()
        loaded, fresh = transfer_weights(unwrap(self.network), weights)
        self.print_to_log_file(f"Stage 1 → Stage 2: loaded {len(loaded)} tensors from {path}")
        self.print_to_log_file(f"New in Stage 2 (trained from scratch): {summarize_modules(fresh)}")

    def load_text_embeddings(self) -> None:
        embeddings, info = load_class_embeddings(self.preprocessed_dataset_folder_base)
        unwrap(self.network).alignment.set_text_embeddings(embeddings)
        self.print_to_log_file(f"CLIP class-prompt embeddings: {info}")
        if self.local_rank != 0:  # one writer under DDP
            return
        # nnUNetv2_dsm_predict embeds free-text prompts with the same text model
        atomic_save_json(os.path.join(self.output_folder_base, TEXT_INFO_FILE),
                         {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))})
        record_text_in_dataset_json(self.output_folder_base)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:  # again: a resumed run (--c) has had nnU-Net copy dataset.json over the record
            record_text_in_dataset_json(self.output_folder_base)

    def load_teacher(self) -> None:
        """The frozen Stage 1 model of ``loss.stage1_distillation`` (also on a resumed run: it is not in this stage's
        checkpoint)."""
        path, weights = self.read_stage1()
        network = self.build_dsm_network(self.configuration_manager, self.num_input_channels, stage=1)
        self.teacher = Stage1Teacher(network, weights, self.device)
        names = [ORGAN_NAMES[i] for i in torch.nonzero(self.teacher.trained).flatten().tolist()]
        self.print_to_log_file(f"Stage 1 teacher from {path}: on the organs a case does not annotate, Stage 2 learns "
                               f"Stage 1's probabilities ({', '.join(names)})")

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:  # a fresh run; `--c` resumes from this stage's own checkpoint instead
            self.load_stage1()
            self.load_text_embeddings()
        self.teacher = None
        if self.stage1_distillation:
            self.load_teacher()

    def prepare_loss(self, batch: dict) -> None:
        """The Stage 1 teacher's organ probabilities of this (augmented) batch for the loss."""
        if self.teacher is not None:
            self.loss.teacher = self.teacher.organ_probabilities(batch["data"])
            self.loss.teacher_trained = self.teacher.trained

    def release_loss(self) -> None:
        self.loss.teacher = None
