"""``nnUNetv2_dsm_predict``: nnUNetv2_predict's flags, any CT in (NIfTI/NRRD/MHA file or folder, DICOM series, any
orientation), self-describing outputs out, plus free-text prompts and anomaly maps."""
from __future__ import annotations

import argparse
import multiprocessing
import sys

import torch

from nnunetv2_dsm.errors import UserError, cli_entry

PROG = "nnUNetv2_dsm_predict"


def _hidden_alias(p: argparse.ArgumentParser, old: str, dest: str, **kw) -> None:
    """An old spelling kept working without showing up in --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kw)


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", required=True, help="input: an image file of any name (.nii.gz/.nii/.nrrd/.mha), a folder "
                   "of them (one case each, or nnU-Net's <case>_0000.nii.gz naming), a DICOM series folder, or a "
                   "folder of DICOM series folders. Any orientation: images are reoriented to the model's (LPS) and "
                   "outputs are written on the input's own grid")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset name or id the model was trained on")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", default="nnUNetTrainerDSMStage2", help="trainer (default nnUNetTrainerDSMStage2)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4), or 'all'")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--continue_prediction", "--c", action="store_true", help="skip cases already predicted")
    p.add_argument("-npp", type=int, default=3, help="cases read and preprocessed ahead (threads; default 3)")
    p.add_argument("-nps", type=int, default=3, help="cases exported in parallel with prediction (default 3)")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts (default 1)")
    p.add_argument("-part_id", type=int, default=0, help="which part this run predicts (0 ... num_parts-1)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    p.add_argument("--disable_progress_bar", action="store_true", help="no sliding-window progress bar")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save_probabilities", action="store_true", help="also write <case>.npz with the 45 "
                   "probabilities, as nnUNetv2_predict does")
    p.add_argument("--save_class_masks", action="store_true",
                   help="write masks/<case>/<class>.nii.gz, one binary file per class (e.g. kidney_left)")
    p.add_argument("--roi_subset", nargs="+", default=None, metavar="CLASS",
                   help="only these classes' masks and statistics, e.g. liver liver_tumor pancreas")
    p.add_argument("--statistics", action="store_true", help="write statistics/<case>.json: per class volume "
                   "(ml), voxels, mean and std intensity (HU)")
    p.add_argument("--preview", action="store_true", help="write preview/<case>.png (three orthogonal slices "
                   "with the label map)")
    p.add_argument("--output_type", default="nifti", choices=["nifti", "dicom_seg"],
                   help="nifti (default) or dicom_seg: a DICOM Segmentation object over the input DICOM series "
                        "(needs highdicom: pip install nnunetv2-dsm[dicom])")
    p.add_argument("--save_anomaly_maps", action="store_true", help="write anomaly_maps/<case>.nii.gz (Eq. 14)")
    p.add_argument("--prompts", nargs="+", default=[], metavar="TEXT",
                   help="free-text class names to segment, e.g. 'pancreas tumor' 'a hepatic cyst' (Stage 2 models); "
                        "embeddings cached by nnUNetv2_dsm_embed_prompts (dataset or model folder) need no CLIP weights")
    p.add_argument("--prompt_threshold", type=float, default=0.5, help="probability threshold of prompt masks")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--clip_weights", default=None, help="CLIP weights file for prompts not cached yet "
                         "(default: the weights the model was trained with; env nnUNet_dsm_clip_weights)")
    weights.add_argument("--random_weights", action="store_true", help="untrained CLIP text tower (tests only)")
    for old, dest, kw in (("--save-anomaly-maps", "save_anomaly_maps", {"action": "store_true"}),
                          ("--save-class-masks", "save_class_masks", {"action": "store_true"}),
                          ("--prompt-threshold", "prompt_threshold", {"type": float}),
                          ("--clip-weights", "clip_weights", {}),
                          ("--random-weights", "random_weights", {"action": "store_true"}),
                          ("--output-type", "output_type", {"choices": ["nifti", "dicom_seg"]})):
        _hidden_alias(p, old, dest, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Predict with a DSM model (nnU-Net's sliding-window predictor) on CT in any format and "
                    "orientation. Writes nnUNetv2_predict's label map (with label_table.json and an ITK-SNAP label "
                    "description saying what each code means) and, on request, per-class masks, statistics, "
                    "previews, DICOM-SEG, free-text prompt masks (--prompts) and anomaly maps.")
    _add_input_flags(p)
    _add_output_flags(p)
    return p


def _folds(values):
    try:
        return [f if f == "all" else int(f) for f in values]
    except ValueError:
        raise UserError(f"-f takes fold numbers or 'all', got {' '.join(values)}") from None


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda: no CUDA GPU is visible to PyTorch here; use -device cpu (or mps on Apple)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("-device mps: Apple's MPS backend is not available here; use -device cpu")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
    return torch.device(name)


def _model_folder(args) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    try:
        return get_output_folder(args.d, args.tr, args.p, args.c)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"-d {args.d}: unknown dataset ({' '.join(str(e).split())[:200]}); check -d and "
                        f"$nnUNet_results / $nnUNet_raw / $nnUNet_preprocessed") from None


def _options(args):
    from nnunetv2_dsm.inference.outputs import class_from_text
    from nnunetv2_dsm.inference.predictor import PredictOptions
    if any(not t.strip() for t in args.prompts):
        raise UserError("an empty prompt was given; name a class, e.g. --prompts 'liver tumor'")
    roi = sorted({class_from_text(t) for t in args.roi_subset}) if args.roi_subset else None
    return PredictOptions(
        prompts=[t.strip() for t in args.prompts], prompt_threshold=args.prompt_threshold,
        save_probabilities=args.save_probabilities, save_anomaly_maps=args.save_anomaly_maps,
        save_class_masks=args.save_class_masks, continue_prediction=args.continue_prediction,
        clip_weights=args.clip_weights, random_weights=args.random_weights, statistics=args.statistics,
        preview=args.preview, roi_subset=roi, output_type=args.output_type, num_processes_export=args.nps,
        num_parts=args.num_parts, part_id=args.part_id, disable_progress_bar=args.disable_progress_bar)


def _user_errors():
    from nnunetv2_dsm.text import TextEmbeddingError
    return (TextEmbeddingError,)


@cli_entry(PROG, _user_errors())
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = _options(args)
    folds = _folds(args.f)
    device = _device(args.device)
    from nnunetv2_dsm.cli.train import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    from nnunetv2_dsm.errors import EXIT_PARTIAL_FAILURE, one_line
    from nnunetv2_dsm.inference.predictor import PartialPredictionError, predict
    try:
        predict(args.i, args.o, _model_folder(args), folds, args.chk, device, args.step_size, not args.disable_tta,
                opts, args.npp, args.verbose)
    except PartialPredictionError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_PARTIAL_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
