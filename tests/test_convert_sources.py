"""Every converter on its miniature distributed layout: outputs checked voxel by voxel against the scene."""
import numpy as np
import pytest
import SimpleITK as sitk

from _convert_helpers import check_dataset, convert_fixture, snapshot
from nnunetv2_dsm.dataset_conversion import fixtures as fxm
from nnunetv2_dsm.dataset_conversion.labelmap import apply_label_map, targets_by_id
from nnunetv2_dsm.dataset_conversion.sources import SOURCES, get_source, guess_sources
from nnunetv2_dsm.dataset_conversion.sources.totalsegmentator import V1_NAMES, V2_NAMES, detect_version
from nnunetv2_dsm.dataset_conversion.spec import annotated_classes, parse_target
from nnunetv2_dsm.labels import tumor_label

VARIANTS = [("btcv", {}), ("chaos", {}), ("pancreas_ct", {}), ("ct_org", {}), ("word", {}), ("amos", {}),
            ("totalsegmentator", {}), ("abdomenct1k", {}), ("lits", {}), ("kits", {"version": "19"}),
            ("kits", {"version": "21"}), ("kits", {"version": "23"}), ("msd", {})]


@pytest.mark.parametrize("source,options", VARIANTS, ids=[s + "".join(o.values()) for s, o in VARIANTS])
def test_converter_on_fixture(tmp_path, source, options):
    from nnunetv2_dsm.dataset_conversion.fixtures import write_fixture
    from nnunetv2_dsm.dataset_conversion.writer import convert_by_name
    fx = write_fixture(source, tmp_path / "in", **options)
    before = snapshot(fx.root)
    summary = convert_by_name(source, fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert summary.ok and summary.dataset_json_written, summary.table()
    assert snapshot(fx.root) == before, "the source folder was modified"
    check_dataset(fx, summary.dataset_dir)
    skipped = " ".join(what for what, _ in summary.notes.skipped)
    for name in fx.skipped:
        assert name in skipped, f"{name} should be a documented skip:\n{summary.table()}"
    assert len(summary.notes.skipped) == len(fx.skipped), summary.table()
    table = summary.table()
    assert "annotated  present" in table and f"labelled cases (imagesTr): {len(fx.train)}" in table


def test_every_source_has_a_fixture_and_a_layout_guess(tmp_path):
    from nnunetv2_dsm.dataset_conversion.fixtures_more import WRITERS
    assert set(WRITERS) == set(SOURCES)
    for name in ("btcv", "lits", "kits", "totalsegmentator", "chaos", "msd"):
        fx = fxm.write_fixture(name, tmp_path / name)
        assert name in guess_sources(fx.root)


def test_tumor_without_annotated_host_is_host_not_annotated(tmp_path):
    fx, summary = convert_fixture(tmp_path, "msd")
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.dataset_dir / "labelsTr" / "MSD06_lung_001.nii.gz")))
    assert set(np.unique(lab)) == {0, tumor_label("Lung Tumor", None)}
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.dataset_dir / "labelsTr" / "MSD10_colon_001.nii.gz")))
    assert set(np.unique(lab)) == {0, tumor_label("Colon Tumor", None)}


def test_label_maps_are_valid_and_by_name():
    for src in SOURCES.values():
        annotated_classes(src.labels)           # validates every name and tumor host
    assert annotated_classes(get_source("kits").labels) == ["Right Kidney", "Left Kidney", "Kidney Tumor",
                                                            "Kidney Cyst"]
    with pytest.raises(ValueError):
        parse_target(("Liver", "Kidney Tumor"))          # a kidney tumor cannot lie in the liver
    with pytest.raises(ValueError):
        parse_target(("Liver", "Spleen"))                # two organs
    with pytest.raises(KeyError):
        parse_target("Livr")


def test_totalsegmentator_names_and_versions():
    ts = get_source("totalsegmentator").labels
    lobes = {n: ts[n] for n in V2_NAMES if n.startswith("lung_")}
    assert lobes == {"lung_upper_lobe_left": "Left Lung", "lung_lower_lobe_left": "Left Lung",
                     "lung_upper_lobe_right": "Right Lung", "lung_middle_lobe_right": "Right Lung",
                     "lung_lower_lobe_right": "Right Lung"}       # all lobes, no left/right swap
    assert ts["inferior_vena_cava"] == "Postcava"
    assert detect_version(V2_NAMES) == "v2" and detect_version(V1_NAMES) == "v1"
    assert V2_NAMES.index("aorta") + 1 == 52 and V1_NAMES.index("aorta") + 1 == 7
    assert V2_NAMES.index("pancreas") + 1 == 7 and V1_NAMES.index("pancreas") + 1 == 10


@pytest.mark.parametrize("grid", ["LPS", "RAS", "LAS", "RPS", "IPL"])
def test_left_right_split_uses_patient_space(grid):
    """One 'kidney' label, two kidneys, a one-kidney patient, and lungs joined across the midline, on five
    array orientations: the side always follows the physical position."""
    g = getattr(fxm, grid)
    ref = g.reference()
    pts = fxm.voxel_centres(ref)
    img = sitk.GetImageFromArray(fxm.scene_image([], pts).astype(np.int16))
    img.CopyInformation(ref)
    targets = targets_by_id({1: "Kidney", 2: "Lung", 3: ("Kidney", "Kidney Tumor")}, "test")
    scenes = [
        [fxm.Box(1, (-36, 0, 10), (-20, 8, 20), ("Right Kidney",)), fxm.Box(1, (20, 0, 10), (28, 8, 20), ("Left Kidney",)),
         fxm.Box(3, (20, 0, 10), (24, 4, 15), ("Left Kidney", "Kidney Tumor"))],
        [fxm.Box(1, (4, 0, 10), (12, 8, 20), ("Left Kidney",))],                 # single kidney, close to the midline
        [fxm.Box(2, (-24, -8, 40), (0, 8, 60), ("Right Lung",)), fxm.Box(2, (0, -8, 40), (28, 8, 60), ("Left Lung",))],
    ]
    for boxes in scenes:
        raw = fxm.raw_label(boxes, pts).astype(np.uint8)
        out = apply_label_map(raw, targets, img, "test.nii.gz")
        case = fxm.FixtureCase("x", boxes)
        np.testing.assert_array_equal(out, case.expected_label(ref))
