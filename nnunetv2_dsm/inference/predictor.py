"""DSM prediction: nnU-Net's predictor plus free-text prompts, anomaly maps and per-class masks.

nnU-Net's ``nnUNetPredictor`` loads the model folder (trainer found through ``nnUNet_extTrainer``), preprocesses
the inputs as in training and runs the sliding window with Gaussian weighting, mirroring and fold averaging. The
DSM network computes the extra channels in the same pass (``inference.open_vocabulary``); the results are
exported channel by channel (``inference.export``):

    OUT/<case>.nii.gz                        label map (nnU-Net regions merged: identical to nnUNetv2_predict)
    OUT/<case>.npz, <case>.pkl               45 probabilities, as nnUNetv2_predict --save_probabilities
    OUT/anomaly_maps/<case>.nii.gz           Eq. 14 anomaly map, float32 (higher = more anomalous)
    OUT/prompts/<prompt_slug>/<case>.nii.gz  binary mask per free-text prompt
    OUT/masks/<case>/<class_slug>.nii.gz     one binary mask per class (TotalSegmentator style)
    OUT/dsm_prompts.json                     per case and prompt: the query that answered, its similarity
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunetv2_dsm.inference.export import label_map, resampled_channels, to_original_grid, write_float_image, write_seg
from nnunetv2_dsm.inference.open_vocabulary import OpenVocabularyOutputs
from nnunetv2_dsm.labels import CLASS_NAMES, LABEL_DTYPE, NUM_CLASSES

TEXT_INFO_FILE = "dsm_text.json"  # written by the Stage 2 trainer next to plans.json


class PredictionError(RuntimeError):
    """Bad input for nnUNetv2_dsm_predict; the message names the file or folder and the fix."""


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
    prompt_slugs: List[str] = field(default_factory=list)


class _ExtraHeadsLabelManager:
    """nnU-Net's sliding window allocates ``label_manager.num_segmentation_heads`` channels; DSM's prediction carries
    prompt and anomaly channels after the 45 classes. Everything else is the dataset's own label manager."""

    def __init__(self, base, extra: int):
        self._base, self._extra = base, extra

    def __getattr__(self, name):
        return getattr(self._base, name)

    @property
    def num_segmentation_heads(self) -> int:
        return self._base.num_segmentation_heads + self._extra


def check_model_folder(model_folder: str, folds, checkpoint_name: str) -> None:
    if not os.path.isdir(model_folder):
        raise PredictionError(f"model folder {model_folder} does not exist: train it first (nnUNetv2_train ... -tr "
                              f"<trainer>) or check -d/-tr/-p/-c and $nnUNet_results")
    for f in folds:
        ckpt = os.path.join(model_folder, f"fold_{f}", checkpoint_name)
        if not os.path.isfile(ckpt):
            raise PredictionError(f"{ckpt} not found: fold {f} is not trained (or not finished; use -chk "
                                  f"checkpoint_best.pth/checkpoint_latest.pth), or pick other folds with -f")


def input_lists(input_folder: str, file_ending: str, n_channels: int) -> List[List[str]]:
    """Cases of an nnU-Net input folder (``<case>_XXXX<ending>``), checked: every channel present and readable."""
    if not os.path.isdir(input_folder):
        raise PredictionError(f"input folder {input_folder} does not exist")
    cases: Dict[str, List[str]] = {}
    for f in sorted(os.listdir(input_folder)):
        if f.startswith(".") or not f.endswith(file_ending):
            continue
        m = re.fullmatch(r"(.+)_(\d{4})" + re.escape(file_ending), f)
        if not m:
            raise PredictionError(f"{os.path.join(input_folder, f)}: input files must be named "
                                  f"<case>_0000{file_ending} (one file per channel, nnU-Net's convention)")
        cases.setdefault(m.group(1), []).append(f)
    if not cases:
        raise PredictionError(f"no {file_ending} images in {input_folder}")
    from nnunetv2_dsm.dataset_conversion.readers import check_nifti_complete
    expected = [f"_{c:04d}{file_ending}" for c in range(n_channels)]
    for case, files in cases.items():
        found = [f[len(case):] for f in files]
        if found != expected:
            raise PredictionError(f"case {case} in {input_folder} has channel files {found}; the model expects "
                                  f"{n_channels} channel(s): {expected}")
        for f in files:
            try:
                check_nifti_complete(__import__("pathlib").Path(input_folder, f))
            except Exception as e:
                raise PredictionError(f"cannot read {os.path.join(input_folder, f)}: {e}") from None
    return [[os.path.join(input_folder, f) for f in files] for files in cases.values()]


def prompt_embeddings(prompts: Sequence[str], model_folder: str, opts: PredictOptions) -> torch.Tensor:
    """CLIP embeddings of the prompts with the text model the checkpoint was trained with (cached per prompt)."""
    from nnunetv2_dsm.text import DEFAULT_MODEL, embed_prompts
    info_file = os.path.join(model_folder, TEXT_INFO_FILE)
    info = json.load(open(info_file)) if os.path.isfile(info_file) else {}
    weights = opts.clip_weights or info.get("weights")
    if info and not info.get("trained_weights", True) and not opts.clip_weights:
        print(f"WARNING: this model was trained with UNTRAINED (random) CLIP text embeddings ({info.get('weights')}): "
              f"free-text prompts are matched to queries by random vectors, not by meaning.")
    return embed_prompts(list(prompts), model_name=info.get("model", DEFAULT_MODEL), clip_weights=weights,
                         random_weights=opts.random_weights,
                         cache_file=[os.path.join(model_folder, "dsm_prompt_embeddings.pt")])


def _outputs_done(out: str, case: str, ending: str, opts: PredictOptions) -> bool:
    files = [os.path.join(out, case + ending)]
    files += [os.path.join(out, case + ".npz")] if opts.save_probabilities else []
    files += [os.path.join(out, "anomaly_maps", case + ".nii.gz")] if opts.save_anomaly_maps else []
    files += [os.path.join(out, "prompts", s, case + ending) for s in opts.prompt_slugs]
    return all(os.path.isfile(f) for f in files)


def export_case(logits: torch.Tensor, properties: dict, predictor, out: str, case: str, opts: PredictOptions) -> Dict:
    """Write every requested output of one case; returns per-prompt voxel counts."""
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    rw, ending = pm.image_reader_writer_class(), dj["file_ending"]
    lm = predictor.label_manager._base if isinstance(predictor.label_manager, _ExtraHeadsLabelManager) \
        else predictor.label_manager
    write_seg(label_map(logits, properties, pm, cm, lm.regions_class_order).astype(LABEL_DTYPE),
              os.path.join(out, case + ending), properties, rw)
    wanted = ([*range(NUM_CLASSES)] if (opts.save_probabilities or opts.save_class_masks) else []) + \
        list(range(NUM_CLASSES, logits.shape[0]))
    probabilities = None
    counts = {}
    threshold_logit = float(np.log(opts.prompt_threshold / (1 - opts.prompt_threshold)))
    for c, ch in resampled_channels(logits, properties, pm, cm, channels=wanted):
        if c < NUM_CLASSES:
            if opts.save_probabilities:  # nnU-Net's npz layout: (45, *original grid), 0 outside the crop
                prob = to_original_grid(1 / (1 + np.exp(-ch)), properties, pm)
                if probabilities is None:
                    probabilities = np.zeros((NUM_CLASSES, *prob.shape), np.float32)
                probabilities[c] = prob
            if opts.save_class_masks:
                os.makedirs(os.path.join(out, "masks", case), exist_ok=True)
                write_seg(to_original_grid((ch > 0).astype(np.uint8), properties, pm),
                          os.path.join(out, "masks", case, slug(CLASS_NAMES[c]) + ending), properties, rw)
        elif c < NUM_CLASSES + len(opts.prompts):
            p = c - NUM_CLASSES
            mask = to_original_grid((ch > threshold_logit).astype(np.uint8), properties, pm)
            counts[opts.prompts[p]] = int(mask.sum())
            os.makedirs(os.path.join(out, "prompts", opts.prompt_slugs[p]), exist_ok=True)
            write_seg(mask, os.path.join(out, "prompts", opts.prompt_slugs[p], case + ending), properties, rw)
        else:
            os.makedirs(os.path.join(out, "anomaly_maps"), exist_ok=True)
            write_float_image(to_original_grid(ch, properties, pm, fill=float(ch.min())),
                              os.path.join(out, "anomaly_maps", case + ".nii.gz"), properties, rw)
    if probabilities is not None:
        from batchgenerators.utilities.file_and_folder_operations import save_pickle
        np.savez_compressed(os.path.join(out, case + ".npz"), probabilities=probabilities)
        save_pickle(properties, os.path.join(out, case + ".pkl"))
    return counts


def _save_json_atomic(obj, path: str) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".partial", path)


def predict(input_folder: str, output_folder: str, model_folder: str, folds, checkpoint_name: str = "checkpoint_final.pth",
            device: torch.device = torch.device("cpu"), step_size: float = 0.5, use_mirroring: bool = True,
            opts: PredictOptions = PredictOptions(), num_processes_preprocessing: int = 1, verbose: bool = False) -> Dict:
    """Predict every case of ``input_folder`` into ``output_folder``; returns the prompt report."""
    from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_dsm.network.dsm import DSMNetwork
    from nnunetv2_dsm.training.trainers import unwrap

    check_model_folder(model_folder, folds, checkpoint_name)
    opts.prompt_slugs = [slug(p) for p in opts.prompts]
    if len(set(opts.prompt_slugs)) != len(opts.prompt_slugs):
        raise PredictionError(f"prompts {list(opts.prompts)} collide in their file names {opts.prompt_slugs}")
    if not 0 < opts.prompt_threshold < 1:
        raise PredictionError(f"--prompt-threshold must lie in (0, 1), got {opts.prompt_threshold}")
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=verbose)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
    network = unwrap(predictor.network)
    if not isinstance(network, DSMNetwork):
        raise PredictionError(f"{model_folder} holds a {type(network).__name__}, not a DSM model: use nnUNetv2_predict")
    if opts.prompts and network.stage != 2:
        raise PredictionError(f"{model_folder} is a Stage 1 model: free-text prompts need Stage 2 "
                              f"(nnUNetTrainerDSMStage2), whose queries are aligned with CLIP text")
    extras = OpenVocabularyOutputs(prompt_embeddings(opts.prompts, model_folder, opts) if opts.prompts else None,
                                   anomaly=opts.save_anomaly_maps)
    if extras.num_channels:
        network.inference_extras = extras
        predictor.label_manager = _ExtraHeadsLabelManager(predictor.label_manager, extras.num_channels)
    dj = predictor.dataset_json
    lists = input_lists(input_folder, dj["file_ending"], len(dj["channel_names"]))
    case_of = lambda files: os.path.basename(files[0])[: -len(dj["file_ending"]) - 5]  # noqa: E731
    os.makedirs(output_folder, exist_ok=True)
    for name, obj in (("dataset.json", dj), ("plans.json", predictor.plans_manager.plans)):
        _save_json_atomic(obj, os.path.join(output_folder, name))
    report_file = os.path.join(output_folder, "dsm_prompts.json")
    report = json.load(open(report_file)) if opts.continue_prediction and os.path.isfile(report_file) else {}
    todo = [f for f in lists if not (opts.continue_prediction and
                                     _outputs_done(output_folder, case_of(f), dj["file_ending"], opts))]
    print(f"{len(lists)} cases in {input_folder}, {len(todo)} to predict")
    if not todo:
        return report
    iterator = preprocessing_iterator_fromfiles(
        todo, None, [os.path.join(output_folder, case_of(f)) for f in todo], predictor.plans_manager, dj,
        predictor.configuration_manager, max(1, num_processes_preprocessing), device.type == "cuda", verbose)
    for item in iterator:
        data = item["data"]
        if isinstance(data, str):  # nnU-Net's iterator hands big arrays over as temporary .npy files
            path, data = data, torch.from_numpy(np.load(data))
            os.remove(path)
        case = os.path.basename(item["ofile"])
        print(f"predicting {case}")
        extras.reset_stats()
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        counts = export_case(logits, item["data_properties"], predictor, output_folder, case, opts)
        if opts.prompts:
            report[case] = [{**r, "voxels": counts[r["prompt"]]} for r in extras.prompt_report(opts.prompts)]
            for r in report[case]:
                print(f"  prompt {r['prompt']!r}: answered by the {r['query']!r} query (similarity "
                      f"{r['similarity']:.3f}, weight {r['weight']:.2f}), {r['voxels']} voxels")
            _save_json_atomic(report, report_file)
    return report
