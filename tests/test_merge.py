"""nnUNetv2_dsm_merge: split of paper Table 1, manifest, links instead of copies, reruns; nnU-Net planning on it."""
import json
import os
import subprocess
import sys

import pytest

from _convert_helpers import convert_fixture, snapshot
from nnunetv2_dsm.dataset_conversion.cli import merge_main
from nnunetv2_dsm.dataset_conversion.merge import merge, split_subsets
from nnunetv2_dsm.dataset_conversion.spec import InputError
from nnunetv2_dsm.labels import dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, load_manifest

INPUTS = [("btcv", 11, {"n_cases": 5}), ("lits", 12, {"n_cases": 5}), ("kits", 13, {"n_cases": 5}),
          ("msd", 14, {}), ("word", 15, {}), ("chaos", 16, {})]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    fixtures = {}
    for source, did, options in INPUTS:
        fx, summary = convert_fixture(tmp, source, did, **options)
        assert summary.ok, summary.table()
        fixtures[source] = (fx, summary.dataset_dir)
    return tmp, fixtures


def test_merge_split_manifest_and_links(converted):
    tmp, fixtures = converted
    raw = tmp / "raw"
    s = merge([str(d) for _, d, _ in INPUTS], 100, raw_dir=raw, seed=0)
    out = s.dataset_dir
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == dataset_json_labels() and ds["regions_class_order"] == regions_class_order()
    m = load_manifest(ds)
    counts = s.counts()
    for src in ("btcv", "lits", "kits"):                      # 40% train, 60% test
        assert dict(counts[src]) == {"train": 2, "test": 3}
    assert dict(counts["msd"]) == {"inference": 7}
    assert dict(counts["word"]) == {"train": 2} and dict(counts["chaos"]) == {"train": 2}
    train = sorted(c for c, i in m.cases.items() if i.subset == "train")
    assert ds["numTraining"] == len(train) == 10
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in train]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train]
    held = sorted(c for c, i in m.cases.items() if i.subset != "train")
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in held]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in held]
    # per-case source, annotated classes and stage come from the converted datasets
    for source, (fx, folder) in fixtures.items():
        src_cases = json.loads((folder / "dataset.json").read_text())[MANIFEST_KEY]["cases"]
        for cid, entry in src_cases.items():
            merged = ds[MANIFEST_KEY]["cases"][cid]
            assert (merged["source"], merged["annotated"], merged["stage"]) == \
                   (entry["source"], entry["annotated"], entry["stage"])
    assert m["LiTS_0000"].stage == 2 and m["BTCV_0001"].stage == 1 and m["MSD03_liver_0"].stage is None
    assert m.training_cases(1) == sorted(c for c in train if m[c].source in ("btcv", "word", "chaos"))
    # hard links: no second copy of any file
    src = fixtures["lits"][1] / "imagesTr" / "LiTS_0001_0000.nii.gz"
    dst = next(out.glob("images*/LiTS_0001_0000.nii.gz"))
    assert os.stat(src).st_ino == os.stat(dst).st_ino
    assert s.links == {"hardlink": 2 * len(m.cases)}
    assert ds["dsm_split"]["seed"] == 0 and ds["dsm_split"]["counts"]["kits"] == {"test": 3, "train": 2}
    assert "splits_final.json" not in os.listdir(out)
    # rerun: idempotent, nothing touched
    before = snapshot(out)
    again = merge([str(d) for _, d, _ in INPUTS], 100, raw_dir=raw, seed=0)
    assert not again.links and snapshot(out) == before
    # another seed: another split, stale files moved, still consistent
    other = merge([str(d) for _, d, _ in INPUTS], 100, raw_dir=raw, seed=1)
    ds1 = json.loads((out / "dataset.json").read_text())
    assert ds1["numTraining"] == len(list((out / "imagesTr").iterdir())) == 10
    assert other.subsets != s.subsets


def test_split_is_reproducible_and_per_source():
    cases = {f"KiTS_{i:05d}": "kits" for i in range(300)} | {f"LiTS_{i:04d}": "lits" for i in range(131)} | \
            {f"BTCV_{i:04d}": "btcv" for i in range(50)} | {f"MSD03_liver_{i}": "msd" for i in range(10)} | \
            {f"TS_s{i:04d}": "totalsegmentator" for i in range(10)}
    a, b = split_subsets(cases, seed=7), split_subsets(dict(reversed(list(cases.items()))), seed=7)
    assert a == b
    count = lambda d, src, sub: sum(1 for c, s in d.items() if cases[c] == src and s == sub)  # noqa: E731
    assert (count(a, "kits", "train"), count(a, "lits", "train"), count(a, "btcv", "train")) == (120, 52, 20)
    assert (count(a, "kits", "test"), count(a, "lits", "test"), count(a, "btcv", "test")) == (180, 79, 30)
    assert count(a, "msd", "inference") == 10 and count(a, "totalsegmentator", "train") == 10
    assert split_subsets(cases, seed=8) != a


def test_symlink_copy_modes_cli_and_errors(converted, capsys):
    tmp, fixtures = converted
    raw = tmp / "raw"
    for mode, did in (("symlink", 101), ("copy", 102)):
        assert merge_main(["-d", str(did), "-i", "11", "Dataset015_WORD", "--link", mode, "-o", str(raw)]) == 0
        out = next(raw.glob(f"Dataset{did}_*"))
        f = out / "imagesTr" / "WORD_0001_0000.nii.gz"
        assert f.is_symlink() == (mode == "symlink") and f.read_bytes()
    assert "inference" in capsys.readouterr().out
    os.environ.pop("nnUNet_raw", None)
    assert merge_main(["-d", "103", "--sources", "lits", "kits", "-o", str(raw)]) == 0
    ds = json.loads(next(raw.glob("Dataset103_*/dataset.json")).read_text())
    assert {e["source"] for e in ds[MANIFEST_KEY]["cases"].values()} == {"lits", "kits"}
    with pytest.raises(InputError, match="is in both"):
        merge(["11", "101"], 104, raw_dir=raw)                # BTCV twice
    with pytest.raises(InputError, match="not found"):
        merge(["Dataset999_Nothing"], 104, raw_dir=raw)
    with pytest.raises(InputError, match="not a dataset written by nnUNetv2_dsm_merge"):
        merge(["12"], 13, name="KiTS", raw_dir=raw)            # would overwrite a converted dataset


def test_nnunet_plan_and_preprocess_on_merged_dataset(converted):
    tmp, _ = converted
    merge(["11", "12", "13", "14", "15"], 110, raw_dir=tmp / "raw", seed=3)
    env = dict(os.environ, nnUNet_raw=str(tmp / "raw"), nnUNet_preprocessed=str(tmp / "pre"),
               nnUNet_results=str(tmp / "res"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"), "-d", "110", "-c",
           "3d_fullres", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    pre = next((tmp / "pre").glob("Dataset110_*"))
    ds = json.loads((pre / "dataset.json").read_text())
    assert MANIFEST_KEY in ds                                   # copied verbatim through preprocessing
    cases = sorted(p.name[:-len(".b2nd")] for p in (pre / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                   if not p.name.endswith("_seg.b2nd"))
    assert cases == sorted(c for c, e in ds[MANIFEST_KEY]["cases"].items() if e["subset"] == "train")
    assert len(list((pre / "gt_segmentations").iterdir())) == ds["numTraining"]
