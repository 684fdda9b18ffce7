"""Installs the `longvl` package: `longvl.kernels`, `longvl.parallel`, `longvl.eagle`.

Everything lives under one import namespace because the bare names are taken: transformers (>= 5.25) imports
Hugging Face's hub-kernels package, whose import name is `kernels`, at start-up.
"""
from setuptools import find_packages, setup

setup(
    name="longvl",
    version="0.2.0",
    description="Triton kernels and context parallelism for long-context vision-language training (Eagle 2.5)",
    packages=find_packages(include=["longvl", "longvl.*"]),
    package_data={"longvl.eagle": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # Floors = the GPU machine's versions (torch 2.11, triton 3.6, transformers 5.17); no upper bounds
        # except where a comment gives the reason. CI resolves the newest releases.
        "torch>=2.11",
        "triton>=3.6",
        # 6.x may change the AttentionInterface / PreTrainedModel APIs our patches and model subclass.
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        # decord ships x86_64 wheels only; elsewhere video falls back to OpenCV.
        "decord==0.6.0; platform_machine == 'x86_64'",
        "opencv-python-headless",
    ],
    extras_require={
        # `kernels` is Hugging Face's hub-kernels package: installed in tests so that a name clash with it
        # (it is imported by transformers >= 5.25) can never come back unseen.
        # `accelerate`: transformers' Trainer needs it (tests/test_eagle_hf.py fine-tunes Eagle with it).
        "test": ["pytest>=8", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "matplotlib", "kernels",
                 "accelerate"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "peers": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],  # the versions our results name
        "flash": ["flash-attn", "ring-flash-attn"],
        "logging": ["tensorboard"],
    },
    entry_points={"console_scripts": [
        "longvl-train = longvl.eagle.train.__main__:main",
        "longvl-index = longvl.eagle.data.index:main",
        "longvl-synthetic = longvl.eagle.data.synthetic:main",
        "longvl-bench = longvl.cli:bench",
        "longvl-bench-report = longvl.cli:bench_report",
    ]},
)
