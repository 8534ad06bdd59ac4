from setuptools import find_packages, setup

setup(
    name="flux-parallel",
    version="0.1.0",
    description="A from-scratch PyTorch framework for exact parallel FLUX.1 inference",
    # one import root, named after the distribution: `kernels`, `flux`, `parallel` ... are other
    # distributions' import names (Hugging Face's kernels, BFL's flux), so nothing else is installed
    packages=find_packages(include=["flux_parallel", "flux_parallel.*"]),
    # the trained tiny model (FluxPipeline.tiny(), --model tiny) and the service's page ship inside the package
    package_data={"flux_parallel.flux": ["assets/tiny/*", "assets/tiny/*/*", "assets/tiny-kontext/*"],
                  "flux_parallel.serve": ["page.html"]},
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
        # diffusers, transformers and peft (diffusers' LoRA loading) are test-only oracles: library code never
        # imports them; the openai client tests the service's OpenAI routes.
        "test": ["pytest", "ruff", "diffusers", "transformers", "peft", "protobuf", "fastapi", "uvicorn", "httpx",
                 "selenium", "openai", "python-multipart"],
        # matplotlib: the scaling chart; distvae: the peer parallel VAE tools/bench/bench_vae.py measures beside ours
        "bench": ["matplotlib", "distvae"],
        # tools/serve.py; its browser test also needs Chromium and chromedriver (Debian: chromium chromium-driver)
        "serve": ["fastapi", "uvicorn", "python-multipart"],  # python-multipart: the edits route's form
        # attention backend `flash_attn` (CUDA); flash-attention 3 (`flash3`, module flash_attn_interface)
        # is installed from source, the flash-attention repository's hopper/ folder
        "flash-attn": ["flash-attn"],
    },
)
