import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("NNUNETV2_DSM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def real_ct_dir():
    """../shared/data/real_ct (or $NNUNETV2_DSM_SHARED/data/real_ct); tests using it skip when it is absent."""
    d = SHARED / "data" / "real_ct"
    if not d.is_dir():
        pytest.skip(f"real CT samples not found at {d} (set NNUNETV2_DSM_SHARED to the shared folder)")
    return d
