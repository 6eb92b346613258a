"""DSM prediction: nnU-Net's predictor plus free-text prompts, anomaly maps and self-describing outputs.

Inputs (``inference.inputs``): an image file of any name, a folder of them (nnU-Net's ``<case>_0000`` naming works),
a DICOM series folder or a folder of series; each is reoriented to LPS (the training orientation) and every output
is written back on the input's own grid. nnU-Net's ``nnUNetPredictor`` loads the model folder (trainer found
through ``nnUNet_extTrainer``), preprocesses as in training and runs the sliding window with Gaussian weighting,
mirroring and fold averaging. The DSM network computes the extra channels in the same pass
(``inference.open_vocabulary``); the results are exported channel by channel (``inference.export``):

    OUT/<case>.nii.gz                        label map (composite codes: identical to nnUNetv2_predict's)
    OUT/label_table.json, label_table_itksnap.txt   what each code means (classes, colour)
    OUT/<case>.npz, <case>.pkl               45 probabilities, as nnUNetv2_predict --save_probabilities
    OUT/anomaly_maps/<case>.nii.gz           Eq. 14 anomaly map, float32 (higher = more anomalous)
    OUT/prompts/<prompt_slug>/<case>.nii.gz  binary mask per free-text prompt
    OUT/masks/<case>/<class>.nii.gz          one binary mask per class (TotalSegmentator style names)
    OUT/statistics/<case>.json               per class: volume (ml), voxels, mean/std intensity (HU)
    OUT/preview/<case>.png                   axial/coronal/sagittal overlay
    OUT/<case>.dcm                           DICOM-SEG over the input series (--output_type dicom_seg)
    OUT/dsm_prompts.json                     per case and prompt: the query that answered, its similarity
"""
from __future__ import annotations

import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_dsm.checkpoint import CheckpointError, load_checkpoint
from nnunetv2_dsm.errors import UserError
from nnunetv2_dsm.inference.export import (label_map, resampled_channels, to_input_grid, to_original_grid,
                                           write_float_image, write_seg)
from nnunetv2_dsm.inference.inputs import InputCase, InputError, find_cases, load_case, select_part
from nnunetv2_dsm.inference.open_vocabulary import OpenVocabularyOutputs
from nnunetv2_dsm.inference.outputs import (CLEAN_NAMES, PREVIEW_FOLDER, STATISTICS_FOLDER, class_statistics,
                                            write_label_tables, write_preview)
from nnunetv2_dsm.io_utils import atomic_target, atomic_write_text
from nnunetv2_dsm.labels import LABEL_DTYPE, NUM_CLASSES
from nnunetv2_dsm.text.model_record import TEXT_INFO_FILE, prompt_cache_files, text_record

OUTPUT_TYPES = ("nifti", "dicom_seg")


class PredictionError(UserError):
    """Bad input for nnUNetv2_dsm_predict; the message names the file or folder and the fix."""


class PartialPredictionError(RuntimeError):
    """Some cases could not be read (each named with the reason); all others were predicted (exit status 1)."""


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not s:
        raise PredictionError(f"prompt {text!r} is empty: give a class name such as 'pancreas tumor'")
    return s


@dataclass
class PredictOptions:
    prompts: Sequence[str] = ()
    prompt_threshold: float = 0.5
    save_probabilities: bool = False
    save_anomaly_maps: bool = False
    save_class_masks: bool = False
    continue_prediction: bool = False
    clip_weights: Optional[str] = None
    random_weights: bool = False
    statistics: bool = False
    preview: bool = False
    roi_subset: Optional[List[int]] = None   # 0-based class indices: masks and statistics of these only
    output_type: str = "nifti"
    num_processes_export: int = 1            # nnU-Net's -nps: cases exported in parallel with prediction
    num_parts: int = 1
    part_id: int = 0
    disable_progress_bar: bool = False
    file_ending: str = ".nii.gz"
    prompt_slugs: List[str] = field(default_factory=list)


class PredictionChannels(LabelManager):
    """The dataset's label manager, telling nnU-Net's sliding window to allocate ``extra`` channels after the 45
    classes (prompt masks, the anomaly map: ``PredictionNetwork``'s heads). Export uses ``dataset_labels``."""

    def __init__(self, dataset_labels: LabelManager, extra: int):
        super().__init__(dataset_labels.label_dict, dataset_labels.regions_class_order,
                         inference_nonlin=dataset_labels.inference_nonlin)
        self.dataset_labels, self.extra_channels = dataset_labels, extra

    @property
    def num_segmentation_heads(self) -> int:
        return super().num_segmentation_heads + self.extra_channels


def check_model_folder(model_folder: str, folds, checkpoint_name: str) -> None:
    """The model folder and each fold's checkpoint exist, and every checkpoint loads without running code."""
    if not os.path.isdir(model_folder):
        raise PredictionError(f"model folder {model_folder} does not exist: train it first (nnUNetv2_train ... -tr "
                              f"<trainer>) or check -d/-tr/-p/-c and $nnUNet_results")
    checkpoints = [(f, os.path.join(model_folder, f"fold_{f}", checkpoint_name)) for f in folds]
    for f, ckpt in checkpoints:
        if not os.path.isfile(ckpt):
            raise PredictionError(f"{ckpt} not found: fold {f} is not trained (or not finished; use -chk "
                                  f"checkpoint_best.pth/checkpoint_latest.pth), or pick other folds with -f")
    # nnU-Net's loader unpickles with weights_only=False: a crafted file would run code. Check each file with
    # the safe loader first (tensors, plain containers and numpy scalars only); a refused file is one line.
    for f, ckpt in checkpoints:
        try:
            load_checkpoint(ckpt, f"checkpoint of fold {f}")
        except CheckpointError as e:
            raise PredictionError(str(e)) from None


def prompt_embeddings(prompts: Sequence[str], model_folder: str, opts: PredictOptions) -> torch.Tensor:
    """CLIP embeddings (P, 512) of the prompts with the text model the checkpoint was trained with, from the caches
    (model folder, dataset, the model's dataset.json record) or, for new prompts, the text tower."""
    import tempfile
    from nnunetv2_dsm.text import DEFAULT_MODEL, embed_prompts
    info, shipped = text_record(model_folder)
    weights = opts.clip_weights or info.get("weights")
    if not info:
        print(f"WARNING: {os.path.join(model_folder, TEXT_INFO_FILE)} is missing (a model shared without it?): "
              f"prompts are embedded with the default CLIP model and weights, which may not be the ones this model "
              f"was trained with. Share DSM models with nnUNetv2_dsm_export_model_to_zip.")
    if info and not info.get("trained_weights", True) and not opts.clip_weights:
        print(f"WARNING: this model was trained with UNTRAINED (random) CLIP text embeddings ({info.get('weights')}): "
              f"free-text prompts are matched to queries by random vectors, not by meaning.")
    with tempfile.TemporaryDirectory() as tmp:
        caches = prompt_cache_files(model_folder)
        if shipped is not None:  # the embeddings shipped in dataset.json, as a read-only cache file
            torch.save(shipped, os.path.join(tmp, "shipped.pt"))
            caches.append(os.path.join(tmp, "shipped.pt"))
        return embed_prompts(list(prompts), model_name=info.get("model", DEFAULT_MODEL), clip_weights=weights,
                             random_weights=opts.random_weights, cache_file=caches)


def _outputs_done(out: str, case: str, ending: str, opts: PredictOptions) -> bool:
    files = [os.path.join(out, case + ending)]
    files += [os.path.join(out, case + ".dcm")] if opts.output_type == "dicom_seg" else []
    files += [os.path.join(out, STATISTICS_FOLDER, case + ".json")] if opts.statistics else []
    files += [os.path.join(out, PREVIEW_FOLDER, case + ".png")] if opts.preview else []
    files += [os.path.join(out, case + ".npz")] if opts.save_probabilities else []
    files += [os.path.join(out, "anomaly_maps", case + ".nii.gz")] if opts.save_anomaly_maps else []
    files += [os.path.join(out, "prompts", s, case + ending) for s in opts.prompt_slugs]
    return all(os.path.isfile(f) for f in files)


def _write_mask(mask_lps: np.ndarray, path: str, properties: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_seg(to_input_grid(mask_lps, properties), path, properties, SimpleITKIO())


def _class_channels(opts: PredictOptions) -> List[int]:
    """The class channels export has to resample: all 45 for probabilities, the selected ones for masks."""
    if opts.save_probabilities:
        return list(range(NUM_CLASSES))
    return list(opts.roi_subset or range(NUM_CLASSES)) if opts.save_class_masks else []


def export_case(logits: torch.Tensor, properties: dict, predictor, out: str, case: str, opts: PredictOptions,
                image_lps: Optional[np.ndarray] = None) -> Dict:
    """Write every requested output of one case from its logits (45 + P + A, *patch grid) on the input's own grid;
    ``image_lps`` (z, y, x) is the CT on the LPS grid (statistics, preview, DICOM-SEG). Returns prompt voxel counts."""
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    ending = opts.file_ending
    labels = getattr(predictor.label_manager, "dataset_labels", predictor.label_manager)
    seg = label_map(logits, properties, plans_manager, configuration_manager,
                    labels.regions_class_order).astype(LABEL_DTYPE)
    write_seg(to_input_grid(seg, properties), os.path.join(out, case + ending), properties, SimpleITKIO())
    if opts.output_type == "dicom_seg":
        from nnunetv2_dsm.inference.dicom_seg import write_dicom_seg
        write_dicom_seg(to_input_grid(seg, properties), properties["dsm_source"], os.path.join(out, case + ".dcm"),
                        opts.roi_subset)
    if opts.statistics and image_lps is not None:
        stats = class_statistics(seg, image_lps, properties["spacing"], opts.roi_subset)
        os.makedirs(os.path.join(out, STATISTICS_FOLDER), exist_ok=True)
        atomic_write_text(os.path.join(out, STATISTICS_FOLDER, case + ".json"), json.dumps(stats, indent=1))
    if opts.preview and image_lps is not None:
        os.makedirs(os.path.join(out, PREVIEW_FOLDER), exist_ok=True)
        write_preview(os.path.join(out, PREVIEW_FOLDER, case + ".png"), image_lps, seg, properties["spacing"])
    probabilities, counts = None, {}
    threshold_logit = float(np.log(opts.prompt_threshold / (1 - opts.prompt_threshold)))
    masks = set(opts.roi_subset or range(NUM_CLASSES)) if opts.save_class_masks else set()
    for c, ch in resampled_channels(logits, properties, plans_manager, configuration_manager,
                                    channels=_class_channels(opts) + list(range(NUM_CLASSES, logits.shape[0]))):
        if c < NUM_CLASSES:
            if opts.save_probabilities:  # nnU-Net's npz layout: (45, *input grid), 0 outside the crop
                prob = to_input_grid(to_original_grid(1 / (1 + np.exp(-ch)), properties, plans_manager), properties)
                if probabilities is None:
                    probabilities = np.zeros((NUM_CLASSES, *prob.shape), np.float32)
                probabilities[c] = prob
            if c in masks:
                _write_mask(to_original_grid((ch > 0).astype(np.uint8), properties, plans_manager),
                            os.path.join(out, "masks", case, CLEAN_NAMES[c] + ending), properties)
        elif c < NUM_CLASSES + len(opts.prompts):
            p = c - NUM_CLASSES
            mask = to_original_grid((ch > threshold_logit).astype(np.uint8), properties, plans_manager)
            counts[opts.prompts[p]] = int(mask.sum())
            _write_mask(mask, os.path.join(out, "prompts", opts.prompt_slugs[p], case + ending), properties)
        else:
            os.makedirs(os.path.join(out, "anomaly_maps"), exist_ok=True)
            anomaly = to_original_grid(ch, properties, plans_manager, fill=float(ch.min()))
            write_float_image(to_input_grid(anomaly, properties),
                              os.path.join(out, "anomaly_maps", case + ".nii.gz"), properties, SimpleITKIO())
    if probabilities is not None:
        from batchgenerators.utilities.file_and_folder_operations import save_pickle
        with atomic_target(os.path.join(out, case + ".npz")) as tmp:
            np.savez_compressed(tmp, probabilities=probabilities)
        save_pickle({k: v for k, v in properties.items() if k != "dsm_reorientation"}, os.path.join(out, case + ".pkl"))
    return counts


def check_options(opts: PredictOptions, step_size: float) -> None:
    """Option values nnU-Net would only trip over later (or silently misuse): UserError naming the flag."""
    if not 0 < step_size <= 1:
        raise PredictionError(f"-step_size must lie in (0, 1] (a fraction of the patch size), got {step_size}")
    if not 0 < opts.prompt_threshold < 1:
        raise PredictionError(f"--prompt_threshold must lie in (0, 1), got {opts.prompt_threshold}")
    if opts.output_type not in OUTPUT_TYPES:
        raise PredictionError(f"--output_type must be one of {', '.join(OUTPUT_TYPES)}, got {opts.output_type!r}")
    opts.prompt_slugs = [slug(p) for p in opts.prompts]
    if len(set(opts.prompt_slugs)) != len(opts.prompt_slugs):
        raise PredictionError(f"prompts {list(opts.prompts)} collide in their file names {opts.prompt_slugs}")


def load_predictor(model_folder: str, folds, checkpoint_name: str, device: torch.device, step_size: float,
                   use_mirroring: bool, opts: PredictOptions, verbose: bool = False):
    """nnU-Net's predictor for a DSM model folder with the extra channels the options ask for installed on the
    network. Returns (predictor, OpenVocabularyOutputs)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_dsm.network.dsm import DSMNetwork

    check_model_folder(model_folder, folds, checkpoint_name)
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=verbose,
                                allow_tqdm=not opts.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
    adapter = getattr(predictor.network, "_orig_mod", predictor.network)     # torch.compile'd with nnUNet_compile
    network = getattr(adapter, "network", adapter)
    if not isinstance(network, DSMNetwork):
        raise PredictionError(f"{model_folder} holds a {type(network).__name__}, not a DSM model: use nnUNetv2_predict")
    if opts.prompts and network.stage != 2:
        raise PredictionError(f"{model_folder} is a Stage 1 model: free-text prompts need Stage 2 "
                              f"(nnUNetTrainerDSMStage2), whose queries are aligned with CLIP text")
    extras = OpenVocabularyOutputs(prompt_embeddings(opts.prompts, model_folder, opts) if opts.prompts else None,
                                   anomaly=opts.save_anomaly_maps)
    if extras.num_channels:
        adapter.heads = [extras]
        predictor.label_manager = PredictionChannels(predictor.label_manager, extras.num_channels)
    return predictor, extras


def preprocessed_cases(cases: Sequence[InputCase], predictor, workers: int = 1
                       ) -> Iterator[Tuple[InputCase, torch.Tensor, dict, np.ndarray]]:
    """Yield, in order, (case, data (C, *resampled grid) float32, nnU-Net properties, CT (z, y, x) on the LPS grid):
    read, checked and reoriented (``inputs.load_case``), then nnU-Net's preprocessing; up to ``workers`` cases are
    prepared ahead in threads (nnU-Net's -npp). A case whose input is unusable yields (case, None, message, None)."""
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    dataset_json = predictor.dataset_json
    preprocessor = configuration_manager.preprocessor_class(verbose=predictor.verbose)

    def prepare(case: InputCase):
        try:
            image, props = load_case(case)
        except InputError as e:
            return case, None, str(e), None
        data, _, props = preprocessor.run_case_npy(image, None, props, plans_manager, configuration_manager,
                                                   dataset_json)
        return case, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), props, image[0]

    workers = max(1, workers)
    with ThreadPoolExecutor(workers) as pool:
        remaining = iter(cases)
        queue = deque(pool.submit(prepare, c) for c in islice(remaining, workers))
        while queue:
            result = queue.popleft().result()
            queue.extend(pool.submit(prepare, c) for c in islice(remaining, 1))
            yield result


def _unique_cases(cases: Sequence[InputCase]) -> None:
    seen: Dict[str, str] = {}
    for c in cases:
        if c.case_id in seen:
            raise PredictionError(f"{seen[c.case_id]} and {c.source} would both be written as {c.case_id}: rename one")
        seen[c.case_id] = c.source


def _prepare_output(output_folder: str, predictor, opts: PredictOptions) -> None:
    os.makedirs(output_folder, exist_ok=True)
    for name, obj in (("dataset.json", predictor.dataset_json), ("plans.json", predictor.plans_manager.plans)):
        atomic_write_text(os.path.join(output_folder, name), json.dumps(obj, indent=1))
    write_label_tables(output_folder)


def predict(input_path: str, output_folder: str, model_folder: str, folds, checkpoint_name: str = "checkpoint_final.pth",
            device: torch.device = torch.device("cpu"), step_size: float = 0.5, use_mirroring: bool = True,
            opts: PredictOptions = PredictOptions(), num_processes_preprocessing: int = 1, verbose: bool = False) -> Dict:
    """Predict every case of ``input_path`` (file, folder, DICOM series; see ``inference.inputs``) into
    ``output_folder``; returns the prompt report {case: [per prompt: query, similarity, weight, voxels]}."""
    check_options(opts, step_size)
    predictor, extras = load_predictor(model_folder, folds, checkpoint_name, device, step_size, use_mirroring, opts,
                                       verbose)
    cases = find_cases(input_path, len(predictor.dataset_json["channel_names"]))
    _unique_cases(cases)
    not_dicom = [c.source for c in cases if not c.dicom]
    if opts.output_type == "dicom_seg" and not_dicom:
        raise PredictionError(f"--output_type dicom_seg needs DICOM series as input; {not_dicom[0]} is not one (use "
                              f"the default NIfTI output)")
    cases = select_part(cases, opts.num_parts, opts.part_id)
    _prepare_output(output_folder, predictor, opts)
    report_file = os.path.join(output_folder, "dsm_prompts.json")
    report = json.load(open(report_file)) if opts.continue_prediction and os.path.isfile(report_file) else {}
    todo = [c for c in cases if not (opts.continue_prediction and
                                     _outputs_done(output_folder, c.case_id, opts.file_ending, opts))]
    print(f"{len(cases)} cases in {input_path}, {len(todo)} to predict")
    pending = deque()

    def finish(case: str, entries, future) -> None:
        counts = future.result()
        if entries is not None:
            report[case] = [{**r, "voxels": counts[r["prompt"]]} for r in entries]
            for r in report[case]:
                print(f"  {case}: prompt {r['prompt']!r}: answered by the {r['query']!r} query (similarity "
                      f"{r['similarity']:.3f}, weight {r['weight']:.2f}), {r['voxels']} voxels")
            atomic_write_text(report_file, json.dumps(report, indent=1))

    failed: Dict[str, str] = {}
    with ThreadPoolExecutor(max(1, opts.num_processes_export)) as exporter:
        for case, data, props, image in preprocessed_cases(todo, predictor, num_processes_preprocessing):
            if data is None:
                print(f"skipping {case.case_id}: {props}")
                failed[case.case_id] = props
                continue
            print(f"predicting {case.case_id} ({case.source})")
            extras.reset_stats()
            logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
            entries = extras.prompt_report(opts.prompts) if opts.prompts else None
            pending.append((case.case_id, entries, exporter.submit(export_case, logits, props, predictor,
                                                                   output_folder, case.case_id, opts, image)))
            while len(pending) > max(1, opts.num_processes_export) - 1:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    if failed and len(failed) == len(todo):
        raise PredictionError(next(iter(failed.values())) if len(failed) == 1 else
                              "no case could be read: " + "; ".join(f"{c}: {why}" for c, why in failed.items()))
    if failed:
        raise PartialPredictionError(f"{len(failed)} of {len(todo)} cases could not be read and were skipped (the "
                                     f"others are in {output_folder}): " +
                                     "; ".join(f"{c}: {why}" for c, why in failed.items()))
    return report
