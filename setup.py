from setuptools import setup

setup(
    name="flux-parallel",
    version="0.1.0",
    description="A from-scratch PyTorch framework for exact parallel FLUX.1 inference",
    packages=["flux", "parallel", "vae", "kernels", "weights"],
    # the trained tiny model (FluxPipeline.tiny(), --model tiny) ships inside the package
    package_data={"flux": ["assets/tiny/*", "assets/tiny/*/*"]},
    python_requires=">=3.10",
    # torch is pinned by the README's install step (a CPU or CUDA wheel of the user's choice);
    # a bare range here keeps pip from replacing it.
    install_requires=[
        "torch>=2.5",
        "einops",
        "safetensors",
        "huggingface-hub",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        # diffusers and transformers are test-only oracles: library code never imports them.
        "test": ["pytest", "ruff", "diffusers", "transformers", "protobuf", "fastapi", "uvicorn", "httpx", "selenium"],
        # matplotlib: the scaling chart; distvae: the peer parallel VAE tools/bench_vae.py measures beside ours
        "bench": ["matplotlib", "distvae"],
        # tools/serve.py; its browser test also needs Chromium and chromedriver (Debian: chromium chromium-driver)
        "serve": ["fastapi", "uvicorn"],
        # attention backend `flash_attn` (CUDA); flash-attention 3 (`flash3`, module flash_attn_interface)
        # is installed from source, the flash-attention repository's hopper/ folder
        "flash-attn": ["flash-attn"],
    },
)
