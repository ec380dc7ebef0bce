"""hybrid: CPU/GPU hybrid inference for Kimi K2.6 / K2.5 / K2-Thinking / DeepSeek-V3.

Install (CPU-only machine, keeps torch off the multi-GB CUDA build):
    pip install torch==2.13.0 && pip install -e ".[test]"
GPU users install their own CUDA build of torch first; the range below accepts it.
"""
from setuptools import find_packages, setup

setup(
    name="hybrid",
    version="0.1.0",
    description="CPU/GPU hybrid inference runtime for Kimi K2.6-class MoE models",
    python_requires=">=3.10",
    packages=find_packages(include=["hybrid", "hybrid.*", "cpu_kernels", "cpu_kernels.*",
                                    "gpu_kernels", "gpu_kernels.*"]),
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy>=1.26",
        "numba>=0.60",
        "safetensors>=0.4",
        "jinja2>=3.1.6",                  # CVE-2025-27516 (sandbox escape) fixed in 3.1.6
        "regex>=2023.0",
        "tqdm>=4.60",
        "rich>=13.0",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.0",
        "prometheus_client>=0.20",
        "Pillow>=10.0",
        "prompt_toolkit>=3.0",
        "llguidance>=1.0,<2",             # grammar-constrained decoding (response_format, forced tool calls)
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "transformers>=5.0",
            "compressed-tensors>=0.12",
            "tiktoken>=0.7",
            "openai>=1.40",
            "httpx>=0.27",
            "pexpect>=4.8",
            "jsonschema>=4",
            "ray[serve]>=2.60,<3",          # tests/test_ray_*.py: a local 2-worker cluster
            "selenium>=4.10",             # the chat page test drives Debian's chromium (.ci/run installs it)
            "triton>=3.0; platform_system == 'Linux'",   # GPU kernels, tested on the CPU (TRITON_INTERPRET=1)
        ],
        "triton": ["triton>=3.0"],
        "ray": ["ray[serve]>=2.60,<3"],          # hybrid batch --ray / hybrid serve --ray (several machines)
    },
    package_data={"hybrid.apps": ["chat_page.html"]},
    entry_points={"console_scripts": ["hybrid=hybrid.apps.cli:main"]},
)
