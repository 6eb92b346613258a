"""nnunetv2-dsm: DSM (diffusion + state space models, Wu et al. 2025) as an nnU-Net v2 extension."""
from setuptools import find_packages, setup

# The repository keeps the converters in a top-level folder `dataset_conversion/`; `nnunetv2_dsm/dataset_conversion`
# is a symbolic link to it, so the source tree imports as laid out (pytest from the root, editable installs) and
# site-packages gets the subpackage `nnunetv2_dsm.dataset_conversion`, no generic top-level name.

setup(
    name="nnunetv2-dsm",
    version="0.1.0",
    description="DSM (k-means Mask Mamba, anomaly prompts, semantic diffusion, CLIP alignment) for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_dsm", "nnunetv2_dsm.*"]),
    include_package_data=True,
    install_requires=[
        "nnunetv2>=2.8.0,<2.9",
        # users bring their own CUDA build of torch; nnunetv2 itself excludes 2.9.*
        "torch>=2.1.2,!=2.9.*",
        "torchvision",
        "open-clip-torch>=2.23",
        "numpy",
        "SimpleITK>=2.2.1",
        "nibabel",
        "pydicom>=2.4",
        "pillow",
        "scipy",
        "tqdm",
        "matplotlib",
        # imported directly (also dependencies of nnunetv2, declared because this package imports them)
        "acvl_utils>=0.2",
        "batchgenerators>=0.25",
        "huggingface_hub",
    ],
    extras_require={
        # CUDA-only selective-scan kernels (README "Building the mamba-ssm kernels"); without them, or when they
        # fail, the package runs its own selective scan. causal-conv1d is not used (the conv is nn.Conv1d).
        "mamba": ["mamba-ssm>=1.2"],
        # nnUNetv2_dsm_predict --output_type dicom_seg
        "dicom": ["highdicom>=0.22"],
        # the tests compare AUROC/FPR95 with scikit-learn and read DICOM-SEG back with highdicom
        "test": ["pytest>=7", "scikit-learn", "highdicom>=0.22"],
    },
    entry_points={
        "console_scripts": [
            "nnUNetv2_dsm_ext_path=nnunetv2_dsm.cli.ext_path:main",
            "nnUNetv2_dsm_train=nnunetv2_dsm.cli.train:main",
            "nnUNetv2_dsm_convert=nnunetv2_dsm.dataset_conversion.cli:convert_main",
            "nnUNetv2_dsm_merge=nnunetv2_dsm.dataset_conversion.cli:merge_main",
            "nnUNetv2_dsm_embed_prompts=nnunetv2_dsm.cli.embed_prompts:main",
            "nnUNetv2_dsm_predict=nnunetv2_dsm.cli.predict:main",
            "nnUNetv2_dsm_export_model_to_zip=nnunetv2_dsm.cli.export_model:main",
            "nnUNetv2_dsm_find_best_configuration=nnunetv2_dsm.evaluation.nnunet_summary:find_best_configuration_main",
            "nnUNetv2_dsm_evaluate=nnunetv2_dsm.cli.evaluate:main",
            "nnUNetv2_dsm_demo=nnunetv2_dsm.cli.demo:main",
        ],
    },
)
