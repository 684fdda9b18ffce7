"""Installs the `kernels`, `parallel` and `eagle` packages as the `longvl` distribution.

The distribution is deliberately not called `kernels`: transformers probes that name for Hugging Face's
hub-kernels library, and our version number (< 0.16) keeps that probe negative.
"""
from setuptools import find_packages, setup

setup(
    name="longvl",
    version="0.1.0",
    description="Triton kernels and context parallelism for long-context vision-language training (Eagle 2.5)",
    packages=find_packages(include=["kernels", "kernels.*", "parallel", "parallel.*", "eagle", "eagle.*"]),
    package_data={"eagle": ["configs/*.yaml", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned: the GPU machine has 2.11, CPU machines take the 2.13 CPU wheel (install.sh).
        "torch>=2.11",
        "triton==3.6.0",
        "transformers>=5.17,<6",
        "safetensors",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "decord==0.6.0; platform_machine == 'x86_64'",
        "opencv-python-headless",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "peers": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
        "flash": ["flash-attn", "ring-flash-attn"],
        "logging": ["tensorboard"],
    },
    entry_points={"console_scripts": []},
)
