"""Install the pretraining system: data preparation, Triton kernels and the DeepSpeed trainer.

Versions are pinned to the set the test suite runs against. torch is pinned too, but install
``torch==2.13.0`` first (``make`` does): a bare torch requirement pulls a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    "triton==3.7.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pandas==2.3.3",
    "h5py==3.16.0",
    "anndata==0.12.19",
    "scikit-learn==1.9.1",
    "numba==0.68.1",
    "pynndescent==0.7.0",
    "igraph==1.0.0",
    "leidenalg==0.12.0",
    "webdataset==1.0.2",
    "deepspeed==0.19.8",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
    "psutil==7.2.2",
    "tqdm==4.70.1",
    "zstandard==0.25.0",
]

setup(
    name="scpretrain",
    version="0.1.0",
    description="Pretraining single-cell RNA-seq foundation models at scale: sharded data, "
    "fused Triton kernels, DeepSpeed ZeRO training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["data_prep*", "kernels*", "pretrain*", "utils*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0", "ruff==0.17.6"],
    },
)
