"""Shared pieces of the fault suite (tests/test_faults_*.py): run a command in-process and check the error contract
(exit code, one line naming the problem, no traceback) and that nothing outside the command's output changed."""
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, List, Sequence

import nibabel as nib
import numpy as np

from nnunetv2_dsm.dataset_conversion.fixtures import write_fixture


def checksums(root: Path, exclude: Iterable[Path] = ()) -> dict:
    """{relative path: (sha1, mtime_ns)} of every file and link below ``root``, leaving out the ``exclude`` trees
    (a command's output). Links are recorded by their target, not followed."""
    root, skip = Path(root), [Path(e) for e in exclude]
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in files + [d for d in dirnames if (here / d).is_symlink()]:
            p = here / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            else:
                out[str(p.relative_to(root))] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def run(main: Callable, argv: Sequence[str], capsys) -> tuple:
    """(exit code, stderr, stdout) of a console-script ``main`` called in-process (argparse's SystemExit too)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """The error contract: the exit code, no traceback, the ``error:`` line holds every fragment (case-insensitive)."""
    assert code == expected_code, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


def btcv(tmp_path: Path, n: int = 2):
    """A BTCV fixture under tmp_path/in (two labelled cases by default)."""
    return write_fixture("btcv", tmp_path / "in", n_cases=n)


def btcv_files(fx) -> tuple:
    """(first image, first label) of a BTCV fixture."""
    base = fx.root / "RawData/Training"
    return base / "img/img0001.nii.gz", base / "label/label0001.nii.gz"


def rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], dtype=None) -> None:
    """Rewrite a NIfTI file's voxels with ``fn`` (optionally in another dtype), keeping its geometry."""
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj).astype(np.float64))
    hdr = img.header.copy()
    hdr.set_data_dtype(dtype or img.get_data_dtype())
    nib.save(nib.Nifti1Image(data.astype(dtype or img.get_data_dtype()), img.affine, hdr), str(path))


def with_values(values: List[float]) -> Callable[[np.ndarray], np.ndarray]:
    """A :func:`rewrite` function putting ``values`` into the first voxels."""
    def fn(a: np.ndarray) -> np.ndarray:
        flat = a.reshape(-1).copy()
        flat[:len(values)] = values
        return flat.reshape(a.shape)
    return fn
