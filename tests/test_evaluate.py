"""Folder evaluation and the nnUNetv2_dsm_evaluate CLI on tiny generated NIfTI cases (values checked by hand)."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm import labels as L
from nnunetv2_dsm.cli.evaluate import main
from nnunetv2_dsm.evaluation.evaluate import (EvaluationError, aggregate, evaluate_folder,
                                              iter_probability_channels)
from nnunetv2_dsm.manifest import ManifestError, make_entry, make_manifest

SHAPE = (6, 8, 10)            # numpy / SimpleITK array order (z, y, x); not symmetric on purpose
SPACING, ORIGIN = (0.8, 0.7, 1.5), (10.0, -5.0, 3.0)
N = int(np.prod(SHAPE))       # 480


def box(z, y, x):
    m = np.zeros(SHAPE, bool)
    m[z, y, x] = True
    return m


S = slice
REF = {
    # c1: liver (150) holding a liver tumor (8), spleen (72)
    "c1": {"Liver": box(S(0, 6), S(0, 5), S(0, 5)), "Liver Tumor": box(S(2, 4), S(1, 3), S(1, 3)),
           "Spleen": box(S(0, 6), S(5, 8), S(6, 10))},
    # c2: both kidneys (96 each), a kidney tumor (8) in the right one
    "c2": {"Right Kidney": box(S(0, 6), S(0, 4), S(0, 4)), "Left Kidney": box(S(0, 6), S(0, 4), S(6, 10)),
           "Kidney Tumor": box(S(2, 4), S(1, 3), S(1, 3))},
}
PRED = {
    # liver 120 voxels all inside the reference liver; tumor 4 of the 8; spleen missed; a stomach false positive
    "c1": {"Liver": box(S(0, 6), S(0, 5), S(0, 4)), "Liver Tumor": box(S(2, 4), S(1, 3), S(1, 2)),
           "Stomach": box(S(0, 2), S(6, 8), S(0, 2))},
    "c2": REF["c2"],
}


def anomaly_map(case):
    a = np.zeros(SHAPE, np.float32)
    r = REF[case]
    if case == "c1":   # liver 0.2 < tumor 0.9 < spleen 0.95: perfect inside the liver, not in the volume
        a[r["Liver"]], a[r["Liver Tumor"]], a[r["Spleen"]] = 0.2, 0.9, 0.95
    else:              # background 0.9 > tumor 0.8 > kidneys 0.1
        a[:] = 0.9
        a[r["Right Kidney"] | r["Left Kidney"]] = 0.1
        a[r["Kidney Tumor"]] = 0.8
    return a


def write(path, array, spacing=SPACING, origin=ORIGIN):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def label_map(masks):
    return L.encode(L.multi_hot_from_classes(masks, SHAPE))


@pytest.fixture
def folders(tmp_path):
    d = {k: tmp_path / k for k in ("ref", "pred", "amap", "out")}
    for p in d.values():
        p.mkdir()
    for case in REF:
        write(d["ref"] / f"{case}.nii.gz", label_map(REF[case]))
        write(d["pred"] / f"{case}.nii.gz", label_map(PRED[case]))
        write(d["amap"] / f"{case}.nii.gz", anomaly_map(case))
    return d


def run(folders, **kw):
    kw.setdefault("num_processes", 1)
    kw.setdefault("output_dir", folders["out"])
    return evaluate_folder(folders["ref"], folders["pred"], **kw)


def test_dsc_by_hand_without_manifest_uses_reference_classes(folders):
    s = run(folders, anomaly_dir=None)
    c1 = s["cases"]["c1"]
    assert set(c1) == {"Liver", "Liver Tumor", "Spleen"}          # stomach is not in the reference
    assert c1["Liver"]["DSC"] == pytest.approx(2 * 120 / (120 + 150))
    assert c1["Liver Tumor"]["DSC"] == pytest.approx(2 * 4 / (4 + 8))
    assert c1["Spleen"]["DSC"] == 0.0 and c1["Spleen"]["n_pred"] == 0 and c1["Spleen"]["n_ref"] == 72
    assert all(r["DSC"] == 1.0 for r in s["cases"]["c2"].values())
    assert "AUROC" not in c1["Liver Tumor"]                       # no anomaly maps, no npz: no scores
    assert any("AUROC/FPR95 not computed" in n for n in s["notes"])
    assert s["mean"]["Liver"] == {"n_cases": 1, "DSC": pytest.approx(240 / 270), "n_DSC": 1}


def test_anomaly_auroc_host_region_versus_volume(folders):
    host = run(folders, anomaly_dir=folders["amap"])              # region defaults to host
    assert host["region"] == "host"
    for case, tumor in (("c1", "Liver Tumor"), ("c2", "Kidney Tumor")):
        rec = host["cases"][case][tumor]
        assert (rec["AUROC"], rec["FPR95"], rec["region"], rec["scores"]) == (1.0, 0.0, "host", "anomaly")
    assert host["cases"]["c1"]["Liver Tumor"]["n_region_voxels"] == 150
    assert host["cases"]["c2"]["Kidney Tumor"]["n_region_voxels"] == 192       # both kidneys
    assert "AUROC" not in host["cases"]["c1"]["Liver"]                          # organs get DSC only
    vol = run(folders, anomaly_dir=folders["amap"], region="volume")
    c1, c2 = vol["cases"]["c1"]["Liver Tumor"], vol["cases"]["c2"]["Kidney Tumor"]
    # c1: the 72 spleen voxels out-score the tumor; c2: the 288 background voxels do
    assert c1["AUROC"] == pytest.approx(400 / 472) and c1["FPR95"] == pytest.approx(72 / 472)
    assert c2["AUROC"] == pytest.approx(184 / 472) and c2["FPR95"] == pytest.approx(288 / 472)
    assert c1["region"] == "volume" and c1["n_region_voxels"] == N
    assert vol["mean"]["Kidney Tumor"]["AUROC"] == pytest.approx(184 / 472)


def _write_manifest(tmp_path, annotated):
    dj = tmp_path / "dataset.json"
    entries = {c: make_entry("btcv", a, subset="test") for c, a in annotated.items()}
    dj.write_text(json.dumps({"name": "x", "dsm_manifest": make_manifest(entries)}))
    return dj


def test_manifest_drives_class_selection_and_true_empties(folders, tmp_path):
    dj = _write_manifest(tmp_path, {"c1": ["Liver", "Liver Tumor", "Stomach", "Pancreas"],
                                    "c2": ["Right Kidney", "Left Kidney", "Kidney Tumor"]})
    s = run(folders, dataset_json=dj, anomaly_dir=folders["amap"])
    c1 = s["cases"]["c1"]
    assert set(c1) == {"Liver", "Liver Tumor", "Stomach", "Pancreas"}  # spleen is not annotated for c1
    assert c1["Stomach"]["DSC"] == 0.0                                 # annotated, absent: a false positive
    assert math.isnan(c1["Pancreas"]["DSC"])                           # annotated, empty in both
    assert s["mean"]["Pancreas"]["n_cases"] == 1 and s["mean"]["Pancreas"]["n_DSC"] == 0
    assert "Spleen" not in s["mean"] and s["class_selection"].startswith("manifest")
    # a case that annotates the tumor but not its host: AUROC over the whole volume, flagged
    dj = _write_manifest(tmp_path, {"c1": ["Liver Tumor"], "c2": ["Kidney Tumor", "Left Kidney"]})
    s = run(folders, dataset_json=dj, anomaly_dir=folders["amap"])
    rec = s["cases"]["c1"]["Liver Tumor"]
    assert rec["region"] == "volume (no host annotation)" and rec["AUROC"] == pytest.approx(400 / 472)
    assert s["mean"]["Liver Tumor"]["volume_fallback_cases"] == ["c1"]
    k = s["cases"]["c2"]["Kidney Tumor"]                               # only the left kidney is annotated
    assert k["region"] == "host" and k["n_region_voxels"] == 96 + 8
    dj = _write_manifest(tmp_path, {"c1": ["Liver"]})
    with pytest.raises(ManifestError, match="c2"):                     # case missing from the manifest
        run(folders, dataset_json=dj)


def test_class_filter(folders):
    s = run(folders, classes=["tumors", "Liver"])
    assert set(s["cases"]["c1"]) == {"Liver", "Liver Tumor"} and set(s["cases"]["c2"]) == {"Kidney Tumor"}
    with pytest.raises(L.UnknownClassError, match="Liver Tumor"):
        run(folders, classes=["Liver Tumour"])


def test_probabilities_npz_as_scores_and_for_dsc(folders):
    for case in REF:  # channel i = class i + 1, array order of sitk.GetArrayFromImage, as nnU-Net saves it
        mh = L.multi_hot_from_classes(REF[case], SHAPE)
        probs = np.where(mh, 0.9, 0.1).astype(np.float16)
        probs[L.class_index("Liver Tumor") - 1][REF["c1"]["Spleen"]] = 0.95 if case == "c1" else 0.1
        np.savez_compressed(folders["pred"] / f"{case}.npz", probabilities=probs)
    s = run(folders, region="volume")                                  # auto: npz, no anomaly maps given
    rec = s["cases"]["c1"]["Liver Tumor"]
    assert rec["scores"] == "probabilities" and rec["AUROC"] == pytest.approx(400 / 472)
    assert s["cases"]["c2"]["Kidney Tumor"]["AUROC"] == 1.0
    s = run(folders, dsc_from="probabilities", anomaly_dir=folders["amap"])
    dsc = {(c, k): r["DSC"] for c, recs in s["cases"].items() for k, r in recs.items()}
    assert dsc.pop(("c1", "Liver Tumor")) == pytest.approx(2 * 8 / (8 + 80))    # + the 72 spleen voxels at 0.95
    assert len(dsc) == 5 and all(v == 1.0 for v in dsc.values())
    assert s["cases"]["c1"]["Liver Tumor"]["scores"] == "anomaly"
    # the streaming reader returns exactly np.load's channels
    full = np.load(folders["pred"] / "c1.npz")["probabilities"]
    got = dict(iter_probability_channels(str(folders["pred"] / "c1.npz"), [0, 30, 44], SHAPE))
    assert set(got) == {0, 30, 44} and all(np.array_equal(got[c], full[c]) for c in got)
    np.savez_compressed(folders["pred"] / "c2.npz", probabilities=np.zeros((45, 8, 6, 10), np.float32))
    with pytest.raises(EvaluationError, match=r"c2\.npz.*shape"):
        run(folders, scores="probabilities")


def test_geometry_mismatch_names_both_files(folders):
    write(folders["pred"] / "c2.nii.gz", label_map(PRED["c2"]), spacing=(0.8, 0.7, 2.0))
    with pytest.raises(EvaluationError, match=r"pred/c2\.nii\.gz.*ref/c2\.nii\.gz.*spacing"):
        run(folders)
    write(folders["pred"] / "c2.nii.gz", label_map(PRED["c2"]), spacing=(0.8, 0.7, 1.5 + 1e-5))
    run(folders)                                                        # within the tolerance
    write(folders["amap"] / "c1.nii.gz", np.zeros((6, 8, 9), np.float32))
    with pytest.raises(EvaluationError, match=r"amap/c1\.nii\.gz.*ref/c1\.nii\.gz.*size"):
        run(folders, anomaly_dir=folders["amap"])


def test_missing_and_unreadable_files(folders):
    (folders["pred"] / "c2.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"1 of 2 reference cases lack files: c2: .*pred/c2\.nii\.gz"):
        run(folders)
    s = run(folders, skip_missing=True)
    assert list(s["cases"]) == ["c1"] and list(s["skipped_cases"]) == ["c2"]
    (folders["pred"] / "c1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(EvaluationError, match=r"cannot read .*pred/c1\.nii\.gz"):
        run(folders, skip_missing=True)
    write(folders["pred"] / "c1.nii.gz", np.full(SHAPE, 200, np.uint8))
    with pytest.raises(EvaluationError, match=r"pred/c1\.nii\.gz holds label values \[200\]"):
        run(folders, skip_missing=True)


def test_aggregate_ignores_nan_but_counts_cases():
    cases = {"a": {"Liver": {"DSC": 0.5}}, "b": {"Liver": {"DSC": float("nan")}}, "c": {"Liver": {"DSC": 1.0}}}
    assert aggregate(cases) == {"Liver": {"n_cases": 3, "DSC": 0.75, "n_DSC": 2}}


def test_multiprocessing_gives_the_same_result(folders):
    one = run(folders, anomaly_dir=folders["amap"], write=False)
    two = run(folders, anomaly_dir=folders["amap"], write=False, num_processes=2)
    assert json.dumps(one["cases"], sort_keys=True) == json.dumps(two["cases"], sort_keys=True)


def test_cli_writes_json_and_csv(folders, tmp_path, capsys):
    dj = _write_manifest(tmp_path, {"c1": ["Liver", "Liver Tumor", "Pancreas"],
                                    "c2": ["Right Kidney", "Left Kidney", "Kidney Tumor"]})
    rc = main(["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "--anomaly-maps", str(folders["amap"]),
               "-dj", str(dj), "--region", "volume", "-o", str(folders["out"]), "-np", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "class" in printed and "n cases" in printed and "FPR95" in printed and "Liver Tumor" in printed
    summary = json.loads((folders["out"] / "dsm_summary.json").read_text())   # strict JSON: NaN written as null
    assert set(json.loads((folders["out"] / "summary.json").read_text())) == {"metric_per_case", "mean",
                                                                              "foreground_mean"}  # nnU-Net's
    assert summary["region"] == "volume" and summary["cases"]["c1"]["Pancreas"]["DSC"] is None
    assert summary["mean"]["Liver Tumor"]["AUROC"] == pytest.approx(400 / 472)
    with open(folders["out"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"case", "class", "metric", "value"}
    got = {(r["case"], r["class"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("c1", "Liver", "DSC")] == pytest.approx(240 / 270)
    assert got[("c2", "Kidney Tumor", "FPR95")] == pytest.approx(288 / 472)
    assert math.isnan(got[("c1", "Pancreas", "DSC")])
    assert not list(folders["out"].glob("*.tmp"))
    # default output folder: the predictions
    assert main(["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-np", "1", "-q"]) == 0
    assert (folders["pred"] / "summary.json").is_file() and (folders["pred"] / "metrics.csv").is_file()


def test_cli_errors_exit_2_with_message(folders, capsys):
    (folders["pred"] / "c1.nii.gz").unlink()
    assert main(["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-np", "1"]) == 2   # errors.py
    err = capsys.readouterr().err
    assert "nnUNetv2_dsm_evaluate: error:" in err and "c1" in err and "--skip_missing" in err
