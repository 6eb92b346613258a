"""``python -m nnunetv2_dsm.accuracy``: the accuracy benchmark (see :mod:`nnunetv2_dsm.accuracy.cli`)."""
import sys

from nnunetv2_dsm.accuracy.cli import main

sys.exit(main())
