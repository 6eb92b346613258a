"""nnUNetv2_dsm_evaluate's summary.json has nnU-Net's structure and, on annotated classes, nnU-Net's numbers."""
import json

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
from nnunetv2_dsm.labels import dataset_json_labels, tumour_label
from nnunetv2_dsm.manifest import make_entry, make_manifest


def _write(path, arr):
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def test_summary_json_matches_nnunet_evaluate_folder_on_annotated_classes(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    rng = np.random.default_rng(0)
    lt = tumour_label("Liver Tumor", "Liver")
    for case in ("a", "b"):
        r = np.zeros((8, 9, 10), np.uint8)
        r[2:6, 2:7, 2:8] = 6
        r[3:5, 3:5, 3:5] = lt
        p = np.where(rng.random(r.shape) < 0.15, rng.choice([0, 6, lt, 1], r.shape), r)  # noise, incl. spleen (1)
        _write(ref / f"{case}.nii.gz", r), _write(pred / f"{case}.nii.gz", p)
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"dsm_manifest": make_manifest(
        {c: make_entry("lits", ["Liver", "Liver Tumor"]) for c in ("a", "b")})}))
    evaluate_folder(ref, pred, dataset_json=dj, num_processes=1, output_dir=tmp_path / "out")
    ours = load_summary_json(str(tmp_path / "out" / "summary.json"))
    labels = dataset_json_labels()
    liver, tumour, spleen = (tuple(labels[n]) for n in ("Liver", "Liver Tumor", "Spleen"))
    theirs = compute_metrics_on_folder(str(ref), str(pred), None, SimpleITKIO(), ".nii.gz", [liver, tumour, spleen],
                                       num_processes=1)
    assert set(ours) == {"metric_per_case", "mean", "foreground_mean"}
    assert set(ours["mean"]) == {liver, tumour}          # spleen is not annotated: not counted
    for o, t in zip(ours["metric_per_case"], theirs["metric_per_case"]):
        assert o["reference_file"].endswith(t["reference_file"].rsplit("/", 1)[1])
        for region in (liver, tumour):
            assert o["metrics"][region] == t["metrics"][region]
    for region in (liver, tumour):
        assert ours["mean"][region]["Dice"] == theirs["mean"][region]["Dice"]
    assert theirs["mean"][spleen]["FP"] > 0  # nnU-Net would have counted the unannotated spleen as false positives
    assert ours["foreground_mean"]["Dice"] == np.mean([theirs["mean"][r]["Dice"] for r in (liver, tumour)])
    dsm = json.loads((tmp_path / "out" / "dsm_summary.json").read_text())
    assert set(dsm["per_source"]) == {"lits"} and "AUROC" not in dsm["mean"]["Liver"]
