"""Speed and peak memory of one real-size case (opt-in: NNUNETV2_DSM_BENCH=1; about 2-3 minutes on 2 cores).

The TotalSegmentator example (CT + 117 masks) is upsampled to 512x512x300 and converted in a child process, which
reports wall time and peak resident memory. Run: ``NNUNETV2_DSM_BENCH=1 pytest -s test_convert_benchmark.py``.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("NNUNETV2_DSM_BENCH") != "1", reason="set NNUNETV2_DSM_BENCH=1")]
SIZE = (512, 512, 300)


def _upsample(img, interp, pixel):
    ref = sitk.Image(SIZE, pixel)
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.GetOrigin())
    ref.SetSpacing([sp * n / m for sp, n, m in zip(img.GetSpacing(), img.GetSize(), SIZE)])
    return sitk.Resample(img, ref, sitk.Transform(), interp, 0, pixel)


def test_real_size_totalsegmentator_case(tmp_path, real_ct_dir):
    ts = real_ct_dir / "totalsegmentator"
    case = tmp_path / "in" / "s0000"
    (case / "segmentations").mkdir(parents=True)
    sitk.WriteImage(_upsample(sitk.ReadImage(str(ts / "example_ct_sm.nii.gz")), sitk.sitkLinear, sitk.sitkInt16),
                    str(case / "ct.nii.gz"), True)
    for p in sorted((ts / "example_seg_fast").glob("*.nii.gz")):
        m = _upsample(sitk.ReadImage(str(p)), sitk.sitkNearestNeighbor, sitk.sitkUInt8)
        sitk.WriteImage(m, str(case / "segmentations" / p.name), True)
    code = ("import sys, time, resource; from nnunetv2_dsm.dataset_conversion.writer import convert_by_name; "
            "t = time.time(); s = convert_by_name('totalsegmentator', sys.argv[1], 1, raw_dir=sys.argv[2], "
            "progress=False); assert s.ok, s.table(); "
            "print('BENCH', time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "raw")],
                         capture_output=True, text=True, check=True).stdout
    seconds, peak_mb = map(float, out.split("BENCH")[1].split())
    print(f"\n{SIZE} TotalSegmentator case: {seconds:.1f} s -> {60 / seconds:.2f} cases/min, peak RSS "
          f"{peak_mb:.0f} MiB (process incl. start-up {time.time() - t:.1f} s)")
    assert peak_mb < 4096
    lab = sitk.ReadImage(str(next((tmp_path / "raw").glob("Dataset001_*")) / "labelsTr" / "TS_s0000.nii.gz"))
    assert lab.GetSize() == SIZE and np.count_nonzero(sitk.GetArrayViewFromImage(lab))
