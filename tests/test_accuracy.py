"""The accuracy benchmark (nnunetv2_dsm.accuracy, scripts/accuracy.py): its logic without training -- budgets,
baseline datasets, the lr choice, scoring and accuracy.json from fake predictions, left/right swaps, the phantom seed
-- and one end-to-end run at a tiny budget (slow)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nnunetv2_dsm.accuracy.baselines import SweepRun, choose_lr, region_labels, write_baseline_dataset
from nnunetv2_dsm.accuracy.budget import Budget, exact_schedule, schedule_for
from nnunetv2_dsm.accuracy.report import build_json, write_json, write_markdown
from nnunetv2_dsm.accuracy.schedule import SEED_ENV, format_schedule, parse_schedule, parse_seed
from nnunetv2_dsm.accuracy.scoring import ScoringInputs, lateral_swaps, score
from nnunetv2_dsm.accuracy.trainers import ScheduleMixin
from nnunetv2_dsm.demo.sources import absent_tumors, expected_multi_hot, write_source
from nnunetv2_dsm.labels import NUM_CLASSES, TUMOR_NAMES, class_index, decode, encode, region_values, tumor_label
from nnunetv2_dsm.phantom import make_case, restrict_to_annotated, write_nifti

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (24, 32, 32)
ISSUE_KEYS = ("seed", "budget", "iterations", "dsc", "anomaly", "prompt", "left_right_swaps")


# ------------------------------------------------------------------------------------------------------- budget
def test_budget_scales_iterations_and_the_baseline_gets_both_stages():
    assert Budget(1.0).iterations() == {"nnunet": 130, "dsm_stage1": 50, "dsm_stage2": 80}
    assert Budget(2.0).iterations() == {"nnunet": 260, "dsm_stage1": 100, "dsm_stage2": 160}   # the demo's
    for b in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 2.0):
        it = Budget(b).iterations()
        assert it["nnunet"] == it["dsm_stage1"] + it["dsm_stage2"], b
        assert Budget(b).nnunet.iterations == it["nnunet"]
    assert Budget(0.25).iterations()["dsm_stage1"] < Budget(1.0).iterations()["dsm_stage1"]
    assert Budget(2.0, sweep_fraction=0.25).sweep.iterations == 70
    assert Budget(1.0, sweep_fraction=1.0).sweep == Budget(1.0).nnunet
    assert schedule_for(0.2).iterations == 1 and exact_schedule(13).iterations == 13
    with pytest.raises(ValueError):
        Budget(0)


def test_schedule_variable_round_trip():
    assert parse_schedule(format_schedule(26, 10, 0.03)) == (26, 10, 0.03)
    assert parse_schedule("3,5") == (3, 5, None)
    for bad in ("3", "0,10", "3,10,-1", "a,b"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


class _NoParent:
    """Stands in for the trainer below ScheduleMixin (nnU-Net's __init__ needs a planned dataset)."""
    initial_lr = 1e-2

    def __init__(self, *args, **kwargs):
        pass


class _SeededTrainer(ScheduleMixin, _NoParent):
    pass


def _draws_after_building(monkeypatch, seed):
    import random

    import torch
    if seed is None:
        monkeypatch.delenv(SEED_ENV, raising=False)
    else:
        monkeypatch.setenv(SEED_ENV, str(seed))
    trainer = _SeededTrainer({}, "3d_fullres", 0, {}, None)
    conv = torch.nn.Conv3d(1, 2, 3)                      # a network initialised after the trainer was built
    return trainer.training_seed, (conv.weight.detach().clone(), np.random.rand(4), random.random())


def _same(a, b) -> bool:
    return bool((a[0] == b[0]).all()) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_the_seed_variable_makes_the_trainers_draws_repeatable(monkeypatch, tmp_path):
    from nnunetv2_dsm.accuracy.runner import AccuracyRun
    seed, first = _draws_after_building(monkeypatch, 3)
    _, again = _draws_after_building(monkeypatch, 3)
    _, other = _draws_after_building(monkeypatch, 4)
    assert seed == 3 and _same(first, again) and not _same(first, other)
    unseeded, a = _draws_after_building(monkeypatch, None)
    _, b = _draws_after_building(monkeypatch, None)
    assert unseeded is None and not _same(a, b)          # unset: nothing is reset (nnU-Net's behaviour)
    assert AccuracyRun(tmp_path / "out", seed=7, echo=lambda s: None).env()[SEED_ENV] == "7"
    assert parse_seed(" 12 ") == 12
    for bad in ("-1", "x", "1.5", ""):
        with pytest.raises(ValueError, match=SEED_ENV):
            parse_seed(bad)


# ---------------------------------------------------------------------------------------------------- baselines
def test_baseline_regions_are_the_sources_classes_in_the_dsm_encoding():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    r = region_labels(["Kidney Cyst", "Right Kidney", "Left Kidney", "Kidney Tumor"])
    assert list(r["labels"]) == ["background", "Right Kidney", "Left Kidney", "Kidney Tumor", "Kidney Cyst"]
    assert r["labels"]["Right Kidney"] == list(region_values(class_index("Right Kidney")))
    assert r["regions_class_order"] == [2, 3, tumor_label("Kidney Tumor"), tumor_label("Kidney Cyst")]
    lm = LabelManager(r["labels"], r["regions_class_order"])
    assert lm.has_regions and lm.num_segmentation_heads == 4
    lits = region_labels(["Liver", "Liver Tumor"])
    assert lits["regions_class_order"] == [class_index("Liver"), tumor_label("Liver Tumor", "Liver")]


def test_write_baseline_dataset_takes_the_sources_training_cases(tmp_path):
    merged = tmp_path / "Dataset500_M"
    cases = {"LiTS_0000": ("lits", "train"), "LiTS_0001": ("lits", "test"), "BTCV_0001": ("btcv", "train")}
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1:3, 1:3, 1:3], lab[2, 2, 2] = class_index("Liver"), tumor_label("Liver Tumor", "Liver")
    for c, (_, subset) in cases.items():
        folder = "Tr" if subset == "train" else "Ts"
        (merged / f"images{folder}").mkdir(parents=True, exist_ok=True)
        (merged / f"images{folder}" / f"{c}_0000.nii.gz").write_text(c)
        _write(merged / f"labels{folder}" / f"{c}.nii.gz", lab)
    manifest = {c: {"source": s, "subset": sub, "annotated": ["Liver", "Liver Tumor"] if s == "lits" else ["Spleen"]}
                for c, (s, sub) in cases.items()}
    (merged / "dataset.json").write_text(json.dumps({"dsm_manifest": {"cases": manifest}}))
    out = write_baseline_dataset(merged, tmp_path / "raw", "lits", 603)
    ds = json.loads((out / "dataset.json").read_text())
    assert out.name == "Dataset603_BaselineLITS" and ds["numTraining"] == 1
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["LiTS_0000_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["LiTS_0000.nii.gz"]
    assert list(ds["labels"]) == ["background", "Liver", "Liver Tumor"]
    with pytest.raises(RuntimeError, match="outside the classes"):   # BTCV's labels hold no spleen value here
        write_baseline_dataset(merged, tmp_path / "raw", "btcv", 601)


def test_choose_lr_takes_the_lowest_final_loss_and_never_a_diverged_run():
    runs = [SweepRun("btcv", 0.01, 10, 0.8, 0.1), SweepRun("btcv", 0.1, 10, math.nan, 0.0),
            SweepRun("btcv", 0.03, 10, 0.5, 0.3)]
    assert choose_lr(runs) == 0.03 and [r.chosen for r in runs] == [False, False, True]
    with pytest.raises(RuntimeError):
        choose_lr([SweepRun("btcv", 0.1, 10, math.nan, math.nan)])


# ------------------------------------------------------------------------------------------------------ scoring
def _kidneys(shape=(8, 12, 12)):
    mh = np.zeros((NUM_CLASSES, *shape), bool)
    mh[class_index("Right Kidney") - 1, 2:6, 2:6, 1:5] = True
    mh[class_index("Left Kidney") - 1, 2:6, 2:6, 7:11] = True
    return mh


def test_lateral_swaps_on_synthetic_masks():
    ref = _kidneys()
    assert lateral_swaps(ref, ref) == []
    swapped = ref.copy()
    r, l_ = class_index("Right Kidney") - 1, class_index("Left Kidney") - 1
    swapped[[r, l_]] = ref[[l_, r]]
    assert lateral_swaps(ref, swapped) == ["Right Kidney", "Left Kidney"]
    partial = ref.copy()                       # right kidney spills a little over the midline: no swap
    partial[r, 2:4, 2:4, 7:8] = True
    assert lateral_swaps(ref, partial) == []
    one = ref.copy()                           # only the left prediction lies on the right kidney
    one[l_] = ref[r]
    assert lateral_swaps(ref, one) == ["Left Kidney"]


def _write(path, arr, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(arr.astype(dtype), (3.0, 3.0, 3.0), str(path))


def _fake_run(tmp_path):
    """Two test cases (LiTS-like with a liver tumor, KiTS-like), one zero-shot case (pancreas tumor); nnU-Net
    and Stage 2 predict the reference exactly, Stage 1 misses the liver tumor and swaps the kidneys."""
    specs = {"LiTS_0001": (["Liver", "Liver Tumor"], ("Liver Tumor",), 1),
             "KiTS_00001": (["Right Kidney", "Left Kidney", "Kidney Tumor", "Kidney Cyst"], ("Kidney Tumor",), 2),
             "MSD07_pancreas_001": (["Pancreas", "Pancreas Tumor"], ("Pancreas Tumor",), 3)}
    ref, annotated, preds, amaps, prompts = {}, {}, {"nnunet": {}, "dsm_stage1": {}, "dsm_stage2": {}}, {}, {}
    rng = np.random.default_rng(0)
    for case, (classes, tumors, seed) in specs.items():
        mh = restrict_to_annotated(make_case(SHAPE, seed=seed, tumors=tumors).multi_hot, classes)
        _write(tmp_path / "ref" / f"{case}.nii.gz", encode(mh))
        ref[case], annotated[case] = tmp_path / "ref" / f"{case}.nii.gz", classes
        t = mh[class_index(tumors[0]) - 1]
        _write(tmp_path / "amap" / f"{case}.nii.gz", t + 0.1 * rng.random(SHAPE), np.float32)
        amaps[case] = tmp_path / "amap" / f"{case}.nii.gz"
        if case.startswith("MSD"):
            _write(tmp_path / "prompt" / f"{case}.nii.gz", t)
            prompts[case] = tmp_path / "prompt" / f"{case}.nii.gz"
            continue
        bad = mh.copy()
        bad[class_index("Liver Tumor") - 1] = False
        r, l_ = class_index("Right Kidney") - 1, class_index("Left Kidney") - 1
        bad[[r, l_]] = mh[[l_, r]]
        for model, m in (("nnunet", mh), ("dsm_stage2", mh), ("dsm_stage1", bad)):
            _write(tmp_path / model / f"{case}.nii.gz", encode(m))
            preds[model][case] = tmp_path / model / f"{case}.nii.gz"
    return ScoringInputs(ref, annotated, ["KiTS_00001", "LiTS_0001"], ["MSD07_pancreas_001"], preds, amaps, prompts)


def test_accuracy_json_structure_from_fake_predictions(tmp_path):
    scores = score(_fake_run(tmp_path))
    doc = build_json(3, 0.5, Budget(0.5).iterations(), scores, [SweepRun("lits", 0.01, 30, 0.5, 0.4, 12.0, True)],
                     {"nnU-Net baselines training": 60.0})
    assert list(doc)[:len(ISSUE_KEYS)] == list(ISSUE_KEYS)
    assert doc["seed"] == 3 and doc["budget"] == 0.5 and doc["iterations"] == Budget(0.5).iterations()
    assert set(doc["dsc"]) == {"nnunet", "dsm_stage1", "dsm_stage2"}
    drawn = {"Liver", "Liver Tumor", "Right Kidney", "Left Kidney", "Kidney Tumor"}   # no cyst drawn: not scored
    assert set(doc["dsc"]["nnunet"]) == drawn and all(v == 1.0 for v in doc["dsc"]["nnunet"].values())
    assert doc["dsc"]["dsm_stage1"]["Liver Tumor"] == 0.0 and doc["dsc"]["dsm_stage1"]["Liver"] == 1.0
    assert doc["dsc"]["dsm_stage1"]["Right Kidney"] < 0.5
    assert list(doc["anomaly"]) == ["Kidney Tumor", "Liver Tumor", "Pancreas Tumor"]
    assert all(v["auroc"] == 1.0 and v["fpr95"] == 0.0 and v["region"] == "host" for v in doc["anomaly"].values())
    assert doc["prompt"] == {"Pancreas Tumor": {"dsc": 1.0, "n_cases": 1}}
    assert doc["left_right_swaps"] == 0 and doc["left_right_swaps_by_model"]["dsm_stage1"] == 1
    assert doc["swapped_cases"]["dsm_stage1"] == {"KiTS_00001": ["Right Kidney", "Left Kidney"]}
    write_json(doc, tmp_path / "accuracy.json")
    assert json.loads((tmp_path / "accuracy.json").read_text()) == doc
    md = write_markdown(doc, tmp_path / "accuracy.md").read_text()
    assert "| Liver Tumor | 1.000 | 0.000 | 1.000 |" in md and "| lits | 0.01 | 30 |" in md


def test_scores_leave_out_models_without_predictions(tmp_path):
    inputs = _fake_run(tmp_path)
    inputs.predictions["dsm_stage1"] = {}
    doc = build_json(0, 1.0, Budget(1.0).iterations(), score(inputs))
    assert doc["dsc"]["dsm_stage1"] == {} and doc["dsc"]["dsm_stage2"]["Liver"] == 1.0


def test_false_tumors_count_tumor_labels_where_the_phantom_draws_none(tmp_path):
    inputs = _fake_run(tmp_path)
    inputs.absent_tumors = {"LiTS_0001": absent_tumors("lits"), "KiTS_00001": absent_tumors("kits")}
    assert "Liver Tumor" not in absent_tumors("lits") and "Kidney Cyst" not in absent_tumors("kits")
    assert set(absent_tumors("btcv")) == set(TUMOR_NAMES)
    # Stage 1 labels a liver tumor (with its liver) in the KiTS case, whose source never draws one
    full = make_case(SHAPE, seed=2, tumors=("Kidney Tumor", "Liver Tumor")).multi_hot
    kits = restrict_to_annotated(full, ["Right Kidney", "Left Kidney", "Kidney Tumor", "Liver", "Liver Tumor"])
    _write(inputs.predictions["dsm_stage1"]["KiTS_00001"], encode(kits))
    n_false = int(decode(encode(kits))[class_index("Liver Tumor") - 1].sum())
    assert n_false > 0
    doc = build_json(0, 1.0, Budget(1.0).iterations(), score(inputs))
    assert doc["false_tumors"]["dsm_stage1"] == {"Liver Tumor": {"voxels": n_false, "cases": 1, "n_cases": 1}}
    # the exact predictions label only tumors their cases have: the LiTS liver tumor is not counted
    assert doc["false_tumors"]["nnunet"] == {} and doc["false_tumors"]["dsm_stage2"] == {}
    md = write_markdown(doc, tmp_path / "accuracy.md").read_text()
    assert f"| DSM Stage 1 | Liver Tumor | {n_false} | 1 / 1 |" in md


# ------------------------------------------------------------------------------------------------------- runner
def test_runner_order_puts_dsm_last_and_rerun_dsm_keeps_the_baselines(tmp_path):
    from nnunetv2_dsm.accuracy.runner import DSM_STEPS, AccuracyRun
    run = AccuracyRun(tmp_path / "out", seed=1, echo=lambda s: None)
    names = [s.name for s in run.steps()]
    assert names[:5] == ["sources", "convert", "merge", "plan", "baseline_data"] and names[-1] == "report"
    f = run._cpu_timed("probe", lambda: subprocess.run([sys.executable, "-c", "sum(range(3 * 10**6))"], check=True))
    f()
    assert run.state["steps"]["probe"]["cpu_seconds"] > 0
    other = AccuracyRun(tmp_path / "out", seed=2, echo=lambda s: None)      # another seed's folder: untouched
    assert max(names.index(n) for n in names if "nnunet" in n) < min(names.index(n) for n in DSM_STEPS)
    dsm_only = [s.name for s in AccuracyRun(tmp_path / "d", seed=1, dsm_only=True, echo=lambda s: None).steps()]
    assert dsm_only == [n for n in names if not n.startswith(("baseline", "sweep", "nnunet", "predict_nnunet"))]
    assert set(DSM_STEPS) <= set(dsm_only) and len(dsm_only) < len(names)
    state = {"preset": run.preset.name, "steps": {n: {"status": "done", "key": ""} for n in names}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / run.state_file).write_text(json.dumps(state))
    (run.pred / "anomaly_maps").mkdir(parents=True)
    (run.pred_nnunet / "lits").mkdir(parents=True)
    run.forget_dsm()
    kept = json.loads((tmp_path / "out" / run.state_file).read_text())["steps"]
    assert sorted(kept) == sorted(n for n in names if n not in DSM_STEPS)
    assert not run.pred.exists() and run.pred_nnunet.exists()
    other = AccuracyRun(tmp_path / "out", seed=2, echo=lambda s: None)          # another seed's folder: untouched
    (tmp_path / "out" / run.state_file).write_text(json.dumps(state))
    other.forget_dsm()
    assert json.loads((tmp_path / "out" / run.state_file).read_text()) == state


# ------------------------------------------------------------------------------------------------------ phantom
def test_seed_changes_the_phantom_and_the_default_is_the_demos():
    demo_img, demo_mh = expected_multi_hot("lits", 0, SHAPE)
    img0, mh0 = expected_multi_hot("lits", 0, SHAPE, seed=0)
    np.testing.assert_array_equal(demo_img, img0)
    np.testing.assert_array_equal(demo_mh, mh0)
    legacy = make_case(SHAPE, seed=3000, tumors=("Liver Tumor",))      # the demo's LiTS case 0, as before
    np.testing.assert_array_equal(legacy.image, demo_img)
    _, mh1 = expected_multi_hot("lits", 0, SHAPE, seed=1)
    tumor = class_index("Liver Tumor") - 1
    assert not np.array_equal(mh1[tumor], mh0[tumor])                  # tumor position / size
    _, mh1v = expected_multi_hot("lits", 0, SHAPE, seed=1, variation=0.15)
    liver = class_index("Liver") - 1
    assert mh1v[liver].sum() != mh1[liver].sum()                         # organ size
    with pytest.raises(ValueError):
        expected_multi_hot("lits", 0, SHAPE, seed=-1)


def test_write_source_with_a_seed_converts_to_its_expected_case(tmp_path):
    import SimpleITK as sitk
    files = write_source("btcv", tmp_path / "btcv", 1, SHAPE, seed=2, variation=0.15)
    img = sitk.DICOMOrient(sitk.ReadImage(str(files[0].image)), "LPS")
    expected, _ = expected_multi_hot("btcv", 0, SHAPE, seed=2, variation=0.15)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected)


# -------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_accuracy_benchmark_end_to_end_at_a_tiny_budget(tmp_path):
    """The whole harness through the real commands (~15 min on 2 busy cores): numbers are meaningless at this budget,
    the test checks that every part runs and accuracy.json has the issue's structure; a re-run skips everything."""
    out = tmp_path / "acc"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "accuracy.py"), "-o", str(out), "--budget", "0.04",
           "--lrs", "0.01", "0.1", "--sweep-fraction", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "accuracy.json").read_text())
    assert list(doc)[:len(ISSUE_KEYS)] == list(ISSUE_KEYS)
    assert doc["iterations"] == {"nnunet": 5, "dsm_stage1": 2, "dsm_stage2": 3}
    assert all(doc["dsc"][m] for m in ("nnunet", "dsm_stage1", "dsm_stage2"))
    assert "Pancreas Tumor" in doc["anomaly"] and "Pancreas Tumor" in doc["prompt"]
    assert [(r["source"], r["lr"]) for r in doc["lr_sweep"]] == [("btcv", 0.01), ("btcv", 0.1)]
    assert sum(r["chosen"] for r in doc["lr_sweep"]) == 1 and set(doc["chosen_lr"]) == {"btcv", "lits", "kits"}
    machine = doc["machine"]      # read at the report: no load average, which would not be the start's
    assert machine["cpu"] and machine["libraries"]["numpy"] and "loadavg_start" not in machine
    assert "Machine: " in (out / "accuracy.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "done earlier" in again.stdout and "nnUNetv2_train" not in again.stdout


def test_machine_record_names_the_simd_flags_and_the_report_prints_it(tmp_path):
    from nnunetv2_dsm.accuracy.report import machine_lines
    from nnunetv2_dsm.benchmark.plans import SIMD_FLAGS, cpu_flags, machine_info
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 sse4_2 fma avx512f other\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse4_2\n")
    assert cpu_flags(str(info)) == ["sse4_2", "avx2", "fma", "avx512f"]   # the first CPU, in SIMD_FLAGS order
    assert cpu_flags(str(tmp_path / "missing")) == []
    m = machine_info("cpu")
    assert set(m["cpu_flags"]) <= set(SIMD_FLAGS) and m["libraries"]["numpy"] and m["libraries"]["SimpleITK"]
    line, = machine_lines({**m, "cpu": "Test CPU", "cpu_flags": ["avx2", "fma"]})
    assert line.startswith("Machine: Test CPU (SIMD: avx2 fma)") and f"numpy {m['libraries']['numpy']}" in line
    assert machine_lines(None) == []
    scores = score(_fake_run(tmp_path))
    doc = build_json(0, 1.0, Budget(1.0).iterations(), scores, [], {}, {"machine": m})
    assert "Machine: " in write_markdown(doc, tmp_path / "with.md").read_text()
    doc.pop("machine")
    assert "Machine: " not in write_markdown(doc, tmp_path / "without.md").read_text()
