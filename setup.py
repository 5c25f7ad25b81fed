"""megatron-osp: Outlier-Safe Pre-Training on Megatron-Core.

Two C++ extensions: the data-index builders (int64 throughout, so trillion-token corpora with more
than 2^31 documents index correctly) and the word cache that makes preprocessing's SentencePiece
BPE encoding fast while staying exact.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megatron_osp.data._index_builders",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),  # rebuild when a shared header changes
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "megatron_osp.data._word_cache",
        ["csrc/tokenize/word_cache.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="megatron-osp",
    version="0.1.0",
    description="Outlier-Safe Pre-Training (Muon + SSNorm + EmbProj) on NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_osp", "megatron_osp.*"]),
    package_data={"megatron_osp": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "pybind11>=2.10",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        # Hugging Face export/import (tools/convert_to_hf.py, convert_from_hf.py).
        "hf": ["transformers>=4.45", "safetensors"],
        # Compressed/columnar corpora and HF tokenizer.json in tools/preprocess_data.py.
        "data": ["zstandard", "pyarrow", "tokenizers"],
        # Plots of tools/evaluate_quantization.py.
        "plots": ["matplotlib"],
        # Weights & Biases logging of training runs (train.wandb_project; training/metric_sinks.py).
        "wandb": ["wandb>=0.16"],
        # Downstream benchmarks of tools/evaluate_downstream.py: lm-evaluation-harness with its HF
        # backend (accelerate), which scores the in-process, quantized model.
        "eval": ["lm-eval[hf]>=0.4.13,<0.5", "transformers>=4.45", "safetensors"],
        "test": [
            "pytest>=7",
            # Two test workers (pyproject.toml's addopts: -n 2 --dist loadfile).
            "pytest-xdist>=3.5",
            # Property-based tests of the readers and preprocessing (tests/test_data_properties.py).
            "hypothesis",
            "scipy",
            "transformers>=4.45",
            "safetensors",
            "zstandard",
            "pyarrow",
            "tokenizers",
            "matplotlib",
            # tests/test_downstream.py (the [eval] extra).
            "lm-eval[hf]>=0.4.13,<0.5",
            # The symmetric Newton-Schulz kernel's tests run it in Triton's CPU interpreter. A lower
            # bound only: a CUDA torch pins its own triton, which this must not fight.
            "triton>=3.2; platform_system == 'Linux'",
        ],
        "te": ["transformer_engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
