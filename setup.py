"""The package list, the one thing pyproject.toml cannot say: deepspeed_configs/ stays at the top
of the repo (where users look for presets) and ships inside the package as
`pipeline.deepspeed_configs`, so an installed copy (the Docker image) resolves every preset by name.
Everything else about the project is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pipeline*", "flows*"]), "pipeline.deepspeed_configs"],
    package_dir={"pipeline.deepspeed_configs": "deepspeed_configs"},
)
