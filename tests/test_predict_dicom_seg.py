"""--output_type dicom_seg: a DICOM Segmentation over the input series (highdicom), read back and compared with the
NIfTI label map of the same run."""
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from _predict_helpers import model, phantom_lps, predict, write_dicom_series  # noqa: F401 (fixture)
from nnunetv2_dsm.labels import CLASS_NAMES, decode

hd = pytest.importorskip("highdicom")


def test_dicom_seg_reads_back_as_the_label_map(model, tmp_path, capsys):
    write_dicom_series(phantom_lps(seed=3), tmp_path / "series")
    assert predict(tmp_path / "series", tmp_path / "out", "--output_type", "dicom_seg") == 0
    multi_hot = decode(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "series.nii.gz"))))
    seg = hd.seg.segread(str(tmp_path / "out" / "series.dcm"))
    present = [c for c in range(45) if multi_hot[c].any()]
    numbers = list(seg.get_segment_numbers())
    assert [seg.get_segment_description(n).segment_label for n in numbers] == [CLASS_NAMES[c] for c in present or [0]]
    sources = sorted((pydicom.dcmread(str(f)) for f in (tmp_path / "series").iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
                                               segment_numbers=numbers)   # (frames, rows, columns, segments)
    np.testing.assert_array_equal(np.moveaxis(pixels, -1, 0).astype(bool), multi_hot[present or [0]])
    sitk.WriteImage(phantom_lps(), str(tmp_path / "ct.nii.gz"))
    assert predict(tmp_path / "ct.nii.gz", tmp_path / "o2", "--output_type", "dicom_seg") == 2
    assert "needs DICOM series as input" in capsys.readouterr().err
