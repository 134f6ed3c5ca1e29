"""fgl-retinanet: focal gradient loss vs focal loss on keras-retinanet 1.0.0."""

from setuptools import find_packages, setup

setup(
    name="fgl-retinanet",
    version="0.1.0",
    description="Focal loss vs focal gradient loss for RetinaNet, on keras-retinanet 1.0.0",
    packages=find_packages(include=["fgl_retinanet", "fgl_retinanet.*"]),
    python_requires=">=3.10,<3.12",
    # Exact pins live in requirements/*.txt (scripts/install.sh); these are the compatible ranges.
    install_requires=[
        "keras-retinanet==1.0.0",
        "keras-resnet==0.2.0",
        "numpy>=1.23,<2",
        "opencv-python<4.11",
        "pyyaml>=6",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "pycocotools>=2.0.7",
    ],
    entry_points={
        "console_scripts": [
            "fgl-train=fgl_retinanet.cli:train_main",
            "fgl-demo=fgl_retinanet.cli:demo_main",
            "fgl-evaluate=fgl_retinanet.cli:evaluate_main",
            "fgl-check-data=fgl_retinanet.cli:check_data_main",
            "fgl-experiment=fgl_retinanet.cli:experiment_main",
            "fgl-compare=fgl_retinanet.cli:compare_main",
            "fgl-plot=fgl_retinanet.cli:plot_main",
        ]
    },
)
