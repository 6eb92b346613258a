"""nnUNetv2_dsm_evaluate's summary.json has nnU-Net's structure and, on annotated classes, nnU-Net's numbers."""
import json

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
from nnunetv2_dsm.labels import dataset_json_labels, tumor_label
from nnunetv2_dsm.manifest import make_entry, make_manifest


def _write(path, arr):
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def test_summary_json_matches_nnunet_evaluate_folder_on_annotated_classes(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    rng = np.random.default_rng(0)
    lt = tumor_label("Liver Tumor", "Liver")
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
    liver, tumor, spleen = (tuple(labels[n]) for n in ("Liver", "Liver Tumor", "Spleen"))
    theirs = compute_metrics_on_folder(str(ref), str(pred), None, SimpleITKIO(), ".nii.gz", [liver, tumor, spleen],
                                       num_processes=1)
    assert set(ours) == {"metric_per_case", "mean", "foreground_mean"}
    assert len(ours["mean"]) == 45 and set(theirs["mean"]) <= set(ours["mean"])  # every region, as nnU-Net's ...
    assert np.isnan(ours["mean"][spleen]["Dice"])        # ... but spleen is annotated nowhere: not counted
    assert all(set(c["metrics"]) == {liver, tumor} for c in ours["metric_per_case"])
    for o, t in zip(ours["metric_per_case"], theirs["metric_per_case"]):
        assert o["reference_file"].endswith(t["reference_file"].rsplit("/", 1)[1])
        for region in (liver, tumor):
            assert o["metrics"][region] == t["metrics"][region]
    for region in (liver, tumor):
        assert ours["mean"][region]["Dice"] == theirs["mean"][region]["Dice"]
    assert theirs["mean"][spleen]["FP"] > 0  # nnU-Net would have counted the unannotated spleen as false positives
    assert ours["foreground_mean"]["Dice"] == np.nanmean([theirs["mean"][r]["Dice"] for r in (liver, tumor)])
    dsm = json.loads((tmp_path / "out" / "dsm_summary.json").read_text())
    assert set(dsm["per_source"]) == {"lits"} and "AUROC" not in dsm["mean"]["Liver"]


def test_cross_validation_accumulation_ranks_on_annotated_classes(tmp_path, monkeypatch):
    """nnU-Net's accumulate_cv_results (what nnUNetv2_find_best_configuration ranks on), run inside
    annotated_classes_in_nnunet_evaluation, writes the annotated-classes summary; outside it nnU-Net's own."""
    from nnunetv2.evaluation.accumulate_cv_results import accumulate_cv_results
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    from nnunetv2_dsm.benchmark.plans import dataset_json_for_benchmark
    from nnunetv2_dsm.evaluation.nnunet_summary import annotated_classes_in_nnunet_evaluation, write_validation_summary
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    labels, model = tmp_path / "raw" / "Dataset996_CV" / "labelsTr", tmp_path / "model"
    (model / "fold_0" / "validation").mkdir(parents=True), labels.mkdir(parents=True)
    r = np.zeros((6, 7, 8), np.uint8)
    r[1:5, 1:6, 1:7] = 6
    p = r.copy()
    p[0] = 1                                            # spleen predicted where the case annotates no spleen
    _write(labels / "a.nii.gz", r), _write(model / "fold_0" / "validation" / "a.nii.gz", p)
    dj = dataset_json_for_benchmark(1)
    dj["dsm_manifest"] = make_manifest({"a": make_entry("lits", ["Liver", "Liver Tumor"])})
    for folder in (labels.parent, model):
        (folder / "dataset.json").write_text(json.dumps(dj))
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset996_CV", "plans_name": "nnUNetPlans",
                                                  "image_reader_writer": "SimpleITKIO", "configurations": {}}))
    with annotated_classes_in_nnunet_evaluation():
        accumulate_cv_results(str(model), str(tmp_path / "cv"), [0], 1)
    assert load_summary_json(str(tmp_path / "cv" / "summary.json"))["foreground_mean"]["Dice"] == 1.0
    # the trainers' final validation: validation/summary.json on the annotated classes as well
    write_validation_summary(str(model / "fold_0" / "validation"), str(labels.parent / "dataset.json"),
                             ref_dir=str(labels), num_processes=1)
    validation = load_summary_json(str(model / "fold_0" / "validation" / "summary.json"))
    assert validation["foreground_mean"]["Dice"] == 1.0 and len(validation["metric_per_case"]) == 1
    accumulate_cv_results(str(model), str(tmp_path / "cv_stock"), [0], 1)   # restored: nnU-Net counts every region
    assert np.isnan(load_summary_json(str(tmp_path / "cv_stock" / "summary.json"))["foreground_mean"]["Dice"]) or \
        load_summary_json(str(tmp_path / "cv_stock" / "summary.json"))["foreground_mean"]["Dice"] < 1.0
