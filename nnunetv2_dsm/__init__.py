"""nnunetv2-dsm: the DSM segmentation model (Wu et al. 2025) as an nnU-Net v2 extension.

Kept import-light on purpose: importing the package must not pull torch or nnunetv2 in.
"""
__version__ = "0.1.0"
