"""Converters from public CT datasets (as distributed) to nnU-Net raw datasets in the DSM label space.

Installed as ``nnunetv2_dsm.dataset_conversion``.
"""
