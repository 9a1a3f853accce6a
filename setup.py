from setuptools import find_packages, setup

setup(
    name="filter-grafting",
    version="0.1.0",
    description="Filter grafting (Meng et al., CVPR 2020) with distillation: one process per network, "
    "entropy-weighted grafting through a shared directory.",
    license="MIT",  # LICENSE
    python_requires=">=3.9",
    # models/ is installed as grafting_models: a top-level 'models' would collide with users' own packages.
    packages=find_packages(include=["grafting", "grafting.*", "grafting_cifar", "grafting_imagenet"])
    + ["grafting_models"],
    package_dir={"grafting_models": "models"},
    install_requires=["torch", "torchvision", "numpy", "tensorboard"],
    # plot: graft-plot's figures (matplotlib is imported only there; everything else runs without it);
    # lightning: grafting.lightning's callback (Lightning is imported only there)
    extras_require={"test": ["pytest", "pytest-xdist"], "plot": ["matplotlib"], "lightning": ["lightning>=2.0"]},
    entry_points={
        "console_scripts": [
            "graft-cifar=grafting_cifar.train:main",
            "graft-imagenet=grafting_imagenet.train:main",
            "graft-filters=grafting.tools.filters:main",
            "graft-ensemble=grafting.tools.ensemble:main",
            "graft-summary=grafting.tools.summary:main",
            "graft-plot=grafting.tools.plot:main",
            "graft-data=grafting.tools.data:main",
            "graft-launch=grafting.launch.cli:main",
        ]
    },
)
