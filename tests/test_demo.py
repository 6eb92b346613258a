"""The demo (nnUNetv2_dsm_demo): phantom sources in the converters' layouts, convert + merge into the expected
manifest and split, the report from a small fake result set, the resumable step driver. The full run is slow."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.dataset_conversion.cli import convert_main, merge_main
from nnunetv2_dsm.dataset_conversion.sources import guess_sources
from nnunetv2_dsm.demo import clip as demo_clip
from nnunetv2_dsm.demo import pipeline
from nnunetv2_dsm.demo.report import ReportCase, select_slice, write_prompt_labels, write_report
from nnunetv2_dsm.demo.sources import HELD_OUT_CLASS, SOURCES, expected_multi_hot, to_grid, phantom_grid, write_source
from nnunetv2_dsm.dataset_conversion.fixtures import IPL, LAS, RAS
from nnunetv2_dsm.labels import class_index, decode, encode, tumor_label
from nnunetv2_dsm.phantom import make_case, write_nifti

SHAPE = (24, 32, 32)
N = {"btcv": 5, "amos": 2, "lits": 5, "kits": 3, "msd": 2}
LAYOUT = {"btcv": "RawData/Training/img/img0001.nii.gz", "amos": "amos22/imagesTr/amos_0001.nii.gz",
          "lits": "media/nas/01_Datasets/CT/LITS/Training Batch 1/volume-0.nii",
          "kits": "kits23/dataset/case_00000/imaging.nii.gz", "msd": "Task07_Pancreas/imagesTr/pancreas_001.nii.gz"}
DIRECTION = {"amos": (-1, 0, 0, 0, -1, 0, 0, 0, 1), "lits": (1, 0, 0, 0, -1, 0, 0, 0, 1),
             "kits": (0, 0, 1, 0, 1, 0, -1, 0, 0)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_sources")
    raw = root / "raw"
    for name, n in N.items():
        write_source(name, root / "src" / name, n, SHAPE)
        assert convert_main([name, str(root / "src" / name), "-d", str(SOURCES[name].dataset_id), "-o", str(raw),
                             "--no-progress"]) == 0
    assert merge_main(["-d", "500", "-i"] + [str(s.dataset_id) for s in SOURCES.values()] +
                      ["-o", str(raw), "--name", "DSMDemo"]) == 0
    return root, raw


def test_to_grid_is_an_exact_reorientation():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for grid in (RAS, LAS, IPL):
        g = phantom_grid(arr.shape, (3.0, 2.0, 1.0), grid)
        out = to_grid(arr, g)
        assert sorted(out.shape) == sorted(arr.shape) and sorted(out.ravel()) == sorted(arr.ravel())
        img = sitk.GetImageFromArray(out)
        img.SetDirection(g.direction.ravel().tolist())
        back = sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))
        np.testing.assert_array_equal(back, arr)


def test_sources_are_written_in_the_distributed_layouts(converted):
    root, _ = converted
    for name, rel in LAYOUT.items():
        assert (root / "src" / name / rel).is_file(), rel
        assert guess_sources(root / "src" / name) == [name]
        img = sitk.ReadImage(str(root / "src" / name / rel))
        np.testing.assert_allclose(img.GetDirection(), DIRECTION.get(name, (1, 0, 0, 0, 1, 0, 0, 0, 1)), atol=1e-6)
    assert sitk.ReadImage(str(root / "src/kits/kits23/dataset/case_00000/imaging.nii.gz")).GetPixelID() == \
        sitk.sitkFloat32
    msd_json = json.loads((root / "src/msd/Task07_Pancreas/dataset.json").read_text())
    assert msd_json["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}


@pytest.mark.parametrize("source,case_id,index", [("btcv", "BTCV_0002", 1), ("amos", "AMOS_0001", 0),
                                                  ("lits", "LiTS_0000", 0), ("kits", "KiTS_00001", 1),
                                                  ("msd", "MSD07_pancreas_001", 0)])
def test_every_source_converts_to_the_phantom_voxel_for_voxel(converted, source, case_id, index):
    _, raw = converted
    folder = next(raw.glob(f"Dataset{SOURCES[source].dataset_id}_*"))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_0000.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz")))
    exp_image, exp_mh = expected_multi_hot(source, index, SHAPE)
    np.testing.assert_array_equal(image, exp_image)
    np.testing.assert_array_equal(decode(label), exp_mh)
    assert exp_mh.any(axis=(1, 2, 3)).sum() >= 2   # organs (and tumors) really are there


def test_merge_split_and_held_out_class(converted):
    _, raw = converted
    ds = json.loads((raw / "Dataset500_DSMDemo" / "dataset.json").read_text())
    cases = ds["dsm_manifest"]["cases"]
    count = {}
    for e in cases.values():
        count[(e["source"], e["subset"])] = count.get((e["source"], e["subset"]), 0) + 1
    assert count == {("btcv", "train"): 2, ("btcv", "test"): 3, ("amos", "train"): 2, ("lits", "train"): 2,
                     ("lits", "test"): 3, ("kits", "train"): 1, ("kits", "test"): 2, ("msd", "inference"): 2}
    assert {e["stage"] for e in cases.values() if e["source"] in ("btcv", "amos")} == {1}
    assert {e["stage"] for e in cases.values() if e["source"] in ("lits", "kits")} == {2}
    held = [c for c, e in cases.items() if HELD_OUT_CLASS in e["annotated"]]
    assert held and all(cases[c]["subset"] == "inference" for c in held)
    assert ds["numTraining"] == 7
    ch = class_index(HELD_OUT_CLASS) - 1
    for f in (raw / "Dataset500_DSMDemo" / "labelsTr").glob("*.nii.gz"):   # never a held-out voxel in training
        assert not decode(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))))[ch].any(), f.name
    for c in held:
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Dataset500_DSMDemo" / "labelsTs" / f"{c}.nii.gz")))
        assert decode(lab)[ch].any()


def _fake_case(tmp, case, subset, seed, tumors):
    pc = make_case(SHAPE, seed=seed, tumors=tumors)
    lab = encode(pc.multi_hot)
    paths = {k: tmp / k / f"{case}.nii.gz" for k in ("img", "ref", "pred", "amap", "prompt")}
    for p in paths.values():
        p.parent.mkdir(exist_ok=True)
    write_nifti(pc.image, pc.spacing, str(paths["img"]))
    write_nifti(lab, pc.spacing, str(paths["ref"]))
    write_nifti(np.where(lab > 25, 0, lab).astype(np.uint8), pc.spacing, str(paths["pred"]))   # misses the tumor
    write_nifti((pc.image < 0).astype(np.float32), pc.spacing, str(paths["amap"]))
    write_nifti((lab > 25).astype(np.uint8), pc.spacing, str(paths["prompt"]))
    return ReportCase(case, subset, "x", paths["img"], paths["ref"], paths["pred"], paths["amap"], paths["prompt"]), lab


def test_report_renders_tables_and_overlays(tmp_path):
    case_a, lab_a = _fake_case(tmp_path, "LiTS_0001", "test", 1, ["Liver Tumor"])
    case_b, _ = _fake_case(tmp_path, "MSD07_pancreas_001", "inference", 2, ["Pancreas Tumor"])
    assert select_slice(lab_a) == int(np.argmax((lab_a > 25).sum((1, 2))))
    mean = lambda **kw: {"n_cases": 1, "DSC": 0.5, "n_DSC": 1, **kw}   # noqa: E731
    summaries = {"test": {"mean": {"Liver": mean(), "Liver Tumor": mean(AUROC=0.9, FPR95=0.2)}},
                 "inference": {"mean": {"Pancreas": mean(), HELD_OUT_CLASS: mean(DSC=0.0, AUROC=0.7, FPR95=0.6)}},
                 "prompt": {"mean": {HELD_OUT_CLASS: mean(DSC=0.25, AUROC=0.7, FPR95=0.6)}}}
    path = write_report(tmp_path / "out", header=["run x"], settings=[("CLIP weights", "random")],
                        steps=[("stage1", "done", 12.0, "logs/06_stage1.log"), ("predict", "failed", 3.0, "")],
                        summaries=summaries, cases=[case_a, case_b], warning="WARNING: untrained text embeddings")
    md = path.read_text()
    assert "| Liver Tumor | label map | 1 | 0.500 | 0.900 | 0.200 |" in md
    assert '| **Pancreas Tumor** | **prompt "pancreas tumor" (zero-shot)** | 1 | **0.250** | 0.700 | 0.600 |' in md
    assert "class query never trained" in md and "> **Warning:** untrained text embeddings" in md
    assert "| stage1 | done | 12 s | logs/06_stage1.log |" in md and "| predict | failed |" in md
    for case in ("LiTS_0001", "MSD07_pancreas_001"):
        png = tmp_path / "out" / "overlays" / f"{case}.png"
        assert f"](overlays/{case}.png)" in md
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = write_report(tmp_path / "out2", header=[], settings=[], steps=[], summaries={}, cases=[])
    assert "_not evaluated" in missing.read_text()


def test_prompt_masks_become_dsm_label_maps(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:5, 4:9, 6:8] = 1
    (tmp_path / "p").mkdir()
    write_nifti(mask, (3.0, 3.0, 3.0), str(tmp_path / "p" / "c1.nii.gz"))
    write_prompt_labels(tmp_path / "p", tmp_path / "l", ["c1"], HELD_OUT_CLASS)
    img = sitk.ReadImage(str(tmp_path / "l" / "c1.nii.gz"))
    assert img.GetSpacing() == (3.0, 3.0, 3.0)
    mh = decode(sitk.GetArrayFromImage(img))
    np.testing.assert_array_equal(mh[class_index(HELD_OUT_CLASS) - 1], mask.astype(bool))
    assert mh.sum() == mask.sum() and tumor_label(HELD_OUT_CLASS) > 25


def test_clip_weights_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_clip, "_hub_cached", lambda: None)
    monkeypatch.delenv("nnUNet_dsm_clip_weights", raising=False)
    c = demo_clip.choose_clip_weights()
    assert c.args == ["--random-weights"] and not c.trained
    assert "cannot be matched" in c.warning() and "anomaly" in c.warning() and "--clip-weights" in c.warning()
    f = tmp_path / "open_clip_pytorch_model.bin"
    f.write_bytes(b"x")
    monkeypatch.setenv("nnUNet_dsm_clip_weights", str(f))
    c = demo_clip.choose_clip_weights()
    assert c.trained and c.args == ["--clip-weights", str(f)] and c.warning() == ""
    with pytest.raises(FileNotFoundError):
        demo_clip.choose_clip_weights(str(tmp_path / "missing.bin"))


def test_steps_resume_skip_and_keep_going(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "choose_clip_weights", lambda w=None: demo_clip.ClipChoice(
        ["--random-weights"], "random(0)", "random", False, []))
    calls, fail = [], {"b"}
    outputs = tmp_path / "outs"
    outputs.mkdir()

    def make(name):
        def run():
            calls.append(name)
            if name in fail:
                raise pipeline.StepFailed(f"{name} broke")
            (outputs / name).touch()
        return pipeline.Step(name, name, run, lambda: (outputs / name).is_file())
    monkeypatch.setattr(pipeline.Demo, "steps", lambda self: [make(n) for n in ("a", "b", "c", "report")])
    lines = []
    demo = lambda **kw: pipeline.Demo(tmp_path / "o", echo=lines.append, **kw)   # noqa: E731
    assert demo().run() == 1 and calls == ["a", "b", "report"]
    state = json.loads((tmp_path / "o" / pipeline.STATE_FILE).read_text())["steps"]
    assert state["b"]["status"] == "failed" and "b broke" in state["b"]["error"] and state["c"]["status"] == "not run"
    fail.clear()
    calls.clear()
    assert demo().run() == 0 and calls == ["b", "c", "report"]          # a is done: skipped
    calls.clear()
    (outputs / "c").unlink()                                          # an output gone: that step runs again
    assert demo().run() == 0 and calls == ["c", "report"]
    fail.add("a")
    (outputs / "a").unlink()
    calls.clear()
    assert demo(keep_going=True).run() == 1 and calls == ["a", "b", "c", "report"]   # after a re-run: all later
    assert any("skipped" in ln for ln in lines)
    assert pipeline.Demo(tmp_path / "o", quick=True, echo=lines.append).run() == 2   # other preset: refused


def test_epoch_printer_condenses_nnunet_output():
    out = []
    p = pipeline.EpochPrinter(out.append, 8)
    for line in ["2026-01-01 10:00:00.1: Epoch 2", "2026-01-01 10:00:01.1: train_loss 0.5",
                 "2026-01-01 10:00:01.2: val_loss 0.4",
                 "2026-01-01 10:00:01.3: Pseudo dice [np.float64(0.5), np.float64(nan), np.float64(0.25)]",
                 "2026-01-01 10:00:01.4: Epoch time: 12.5 s", "noise"]:
        p(line)
    assert out == ["    epoch 3/8  train_loss 0.5  val_loss 0.4  pseudo Dice (mean over annotated classes) 0.375  "
                   "12.5 s"]


def test_cli_help_and_default_output():
    from nnunetv2_dsm.cli.demo import build_parser
    a = build_parser().parse_args([])
    assert a.output == "dsm_demo_output" and not a.quick and a.clip_weights is None and not a.keep_going
    r = subprocess.run([sys.executable, "-c", "from nnunetv2_dsm.cli.demo import main; main(['--help'])"],
                       capture_output=True, text=True)
    assert "--quick" in r.stdout and "--clip-weights" in r.stdout


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The whole pipeline through the real commands with the _tiny trainers (several minutes on 2 CPU cores)."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_dsm_demo"), "--quick", "--output",
                        str(tmp_path / "demo"), "-device", "cpu"], env=env, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "prompt \"pancreas tumor\" (zero-shot)" in md and "Warning:" in md
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 8
    r2 = subprocess.run(r.args, env=env, capture_output=True, text=True, timeout=600)   # resumes: all skipped
    assert r2.returncode == 0 and r2.stdout.count("skipped") == 9
