"""mtfc: multi-task feature compression for split computing."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mtfc",
    version="0.1.0",
    description="One shared compressed latent (Entropic Student + learned entropy model), many task heads.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mtfc", "mtfc.*", "heads", "heads.*"]),
    include_package_data=True,
    package_data={"mtfc": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.13",
        "torchvision>=0.19",
        "numpy<2",
        "compressai==1.2.8",
        "albumentations>=2.0,<2.1",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "pycocotools",
        "constriction>=0.4",  # bounds-safe range coder for the bitstream
        "scipy",  # clustering-based tap selection (mtfc.distill); compressai and albumentations need it too
    ],
    extras_require={
        # detectron2 itself is not on PyPI: tools/setup.sh installs its Python package (see README).
        "detection": ["fvcore", "iopath", "yacs", "termcolor", "tabulate", "cloudpickle", "omegaconf", "hydra-core"],
        "segmentation": ["mmengine==0.10.7", "mmcv==2.1.0", "mmsegmentation==1.2.2", "ftfy", "regex"],
        # the deployed path (mtfc/deploy): ONNX export + ONNX Runtime device encoder, FastAPI/uvicorn server, httpx client
        "deploy": ["onnx", "onnxruntime", "fastapi", "uvicorn", "httpx", "prometheus_client"],
        "dev": ["pytest", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["mtfc=mtfc.cli:main"]},
)
