from setuptools import setup

setup(
    name="flux-parallel",
    version="0.1.0",
    description="A from-scratch PyTorch framework for exact parallel FLUX.1 inference",
    packages=["flux", "parallel", "vae", "kernels", "weights"],
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
        "test": ["pytest", "diffusers", "transformers", "protobuf"],
        # matplotlib: the scaling chart; distvae: the peer parallel VAE tools/bench_vae.py measures beside ours
        "bench": ["matplotlib", "distvae"],
    },
)
