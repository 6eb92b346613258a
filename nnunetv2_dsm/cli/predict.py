"""``nnUNetv2_dsm_predict``: nnUNetv2_predict's flags plus free-text prompts, anomaly maps and per-class masks."""
from __future__ import annotations

import argparse
import multiprocessing
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Predict with a DSM model (nnU-Net's sliding-window predictor). Besides nnUNetv2_predict's "
                    "outputs it can segment any class named in free text (--prompts), write the Eq. 14 anomaly "
                    "map (--save-anomaly-maps) and one binary mask per class (--save-class-masks).")
    p.add_argument("-i", required=True, help="input folder: <case>_0000.nii.gz files (nnU-Net naming)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset name or id the model was trained on")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", default="nnUNetTrainerDSMStage2", help="trainer (default nnUNetTrainerDSMStage2)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save_probabilities", action="store_true", help="also write <case>.npz with the 45 "
                   "probabilities, as nnUNetv2_predict does")
    p.add_argument("--continue_prediction", "--c", action="store_true", help="skip cases already predicted")
    p.add_argument("-npp", type=int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--prompts", nargs="+", default=[], metavar="TEXT",
                   help="free-text class names to segment, e.g. 'pancreas tumor' 'a hepatic cyst' (Stage 2 models)")
    p.add_argument("--prompt-threshold", type=float, default=0.5, help="probability threshold of prompt masks")
    p.add_argument("--save-anomaly-maps", action="store_true", help="write anomaly_maps/<case>.nii.gz (Eq. 14)")
    p.add_argument("--save-class-masks", action="store_true",
                   help="write masks/<case>/<class>.nii.gz, one binary file per class")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--clip-weights", default=None, help="CLIP weights file for prompts not cached yet "
                         "(default: the weights the model was trained with; env nnUNet_dsm_clip_weights)")
    weights.add_argument("--random-weights", action="store_true", help="untrained CLIP text tower (tests only)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from nnunetv2_dsm.cli.train import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2_dsm.inference.predictor import PredictionError, PredictOptions, predict
    from nnunetv2_dsm.text import TextEmbeddingError

    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
    folds = [f if f == "all" else int(f) for f in args.f]
    if any(not t.strip() for t in args.prompts):
        sys.exit("nnUNetv2_dsm_predict: error: an empty prompt was given; name a class, e.g. --prompts 'liver tumor'")
    opts = PredictOptions(prompts=[t.strip() for t in args.prompts], prompt_threshold=args.prompt_threshold,
                          save_probabilities=args.save_probabilities, save_anomaly_maps=args.save_anomaly_maps,
                          save_class_masks=args.save_class_masks, continue_prediction=args.continue_prediction,
                          clip_weights=args.clip_weights, random_weights=args.random_weights)
    try:
        model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
        predict(args.i, args.o, model_folder, folds, args.chk, torch.device(args.device), args.step_size,
                not args.disable_tta, opts, args.npp, args.verbose)
    except (PredictionError, TextEmbeddingError) as e:
        sys.exit(f"nnUNetv2_dsm_predict: error: {e}")


if __name__ == "__main__":
    main()
