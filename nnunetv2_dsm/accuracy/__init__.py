"""The accuracy benchmark (``python scripts/accuracy.py -o OUT [--seed N] [--budget X]``): on the built-in phantom
sources, per-dataset nnU-Net baselines (nnUNetTrainerNoDA, learning rate by a reported sweep) against DSM Stage 1 and
Stage 2, all trained with the stock ``nnUNetv2_*`` commands on the same training cases, scored on the test set (DSC
per class, left/right swaps) and the zero-shot set (anomaly-map AUROC / FPR95 inside the host organ, prompt DSC).

Modules: :mod:`.budget` (iterations from ``--budget``), :mod:`.baselines` (per-source baseline datasets, the sweep),
:mod:`.scoring` (metrics from label maps), :mod:`.report` (accuracy.json / accuracy.md), :mod:`.runner` (the
resumable steps, on the demo's driver), :mod:`.cli`. See docs/accuracy.md.
"""
