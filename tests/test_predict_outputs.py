"""Self-describing outputs of nnUNetv2_dsm_predict: label table, clean mask names, statistics, preview, ROI subset."""
import json
import re

import numpy as np
import SimpleITK as sitk
from PIL import Image

from _predict_helpers import SPACING, model, phantom_lps, predict  # noqa: F401 (fixture)
from nnunetv2_dsm.inference.outputs import CLEAN_NAMES, class_statistics, label_table
from nnunetv2_dsm.labels import MAX_LABEL, decode, tumor_label


def test_label_table_says_what_each_code_means():
    table = label_table()
    assert len(table) == MAX_LABEL + 1
    code = str(tumor_label("Liver Tumor", "Liver"))
    assert table[code]["classes"] == ["Liver", "Liver Tumor"] and table[code]["files"] == ["liver", "liver_tumor"]
    assert table["25"]["files"] == ["celiac_trunk"] and table["2"]["files"] == ["kidney_right"]
    assert len(set(CLEAN_NAMES)) == 45 and all(re.fullmatch(r"[a-z0-9_]+", n) for n in CLEAN_NAMES)


def test_class_statistics_count_every_code_of_a_class():
    seg = np.zeros((4, 5, 6), np.uint8)
    seg[0] = 6                                           # liver
    seg[1, :2] = tumor_label("Liver Tumor", "Liver")    # liver tumor inside the liver: counts for both
    image = np.arange(seg.size, dtype=np.float32).reshape(seg.shape)
    stats = class_statistics(seg, image, (2.0, 1.0, 0.5))
    liver, tumor = seg == 6, seg == tumor_label("Liver Tumor", "Liver")
    assert stats["liver"]["voxels"] == 42 and stats["liver_tumor"]["voxels"] == 12
    assert stats["liver"]["volume"] == 42 * 1e-3
    assert stats["liver"]["intensity"] == round(image[liver | tumor].mean(), 2)
    assert stats["liver_tumor"]["intensity_std"] == round(image[tumor].std(), 2)
    assert stats["spleen"] == {"volume": 0.0, "voxels": 0, "intensity": None, "intensity_std": None}


def test_statistics_masks_preview_and_roi_subset(model, tmp_path):
    ct = phantom_lps(seed=0)
    sitk.WriteImage(ct, str(tmp_path / "abdomen.nii.gz"))
    out = tmp_path / "out"
    assert predict(tmp_path / "abdomen.nii.gz", out, "--statistics", "--preview", "--save_class_masks",
                   "--roi_subset", "Liver", "kidney_left", "spleen") == 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "abdomen.nii.gz")))
    assert sorted(p.name for p in (out / "masks" / "abdomen").iterdir()) == \
        ["kidney_left.nii.gz", "liver.nii.gz", "spleen.nii.gz"]
    stats = json.loads((out / "statistics" / "abdomen.json").read_text())
    assert sorted(stats) == ["kidney_left", "liver", "spleen"]
    multi_hot, hu = decode(seg), sitk.GetArrayFromImage(ct).astype(np.float64)
    for name, index in (("liver", 5), ("spleen", 0), ("kidney_left", 2)):
        m = multi_hot[index]
        assert stats[name]["voxels"] == int(m.sum())
        assert abs(stats[name]["volume"] - m.sum() * np.prod(SPACING) / 1000) < 1e-3
        if m.any():
            assert abs(stats[name]["intensity"] - hu[m].mean()) < 0.01
            assert abs(stats[name]["intensity_std"] - hu[m].std()) < 0.01
    table = json.loads((out / "label_table.json").read_text())["labels"]
    assert table == json.loads(json.dumps(label_table()))
    lines = [ln for ln in (out / "label_table_itksnap.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == MAX_LABEL + 1 and lines[6].split()[:4] == ["6", *map(str, table["6"]["color"])]
    assert lines[6].endswith('"Liver"')
    png = Image.open(out / "preview" / "abdomen.png")
    assert png.mode == "RGB" and png.width > png.height > 32


def test_parts_and_continue_prediction(model, tmp_path, capsys):
    for name, seed in (("a", 4), ("b", 5)):
        sitk.WriteImage(phantom_lps(seed=seed), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    assert predict(tmp_path, out, "-num_parts", "2", "-part_id", "1") == 0
    assert not (out / "a.nii.gz").exists() and (out / "b.nii.gz").is_file()
    capsys.readouterr()
    assert predict(tmp_path, out, "--continue_prediction") == 0
    printed = capsys.readouterr().out
    assert ", 1 to predict" in printed and "predicting a" in printed and "predicting b" not in printed
    assert (out / "a.nii.gz").is_file()
