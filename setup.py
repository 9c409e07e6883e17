"""Package discovery for the three top-level folders that form the ``clipfuse`` namespace.

setuptools' own ``packages.find`` cannot map ``export/`` to ``clipfuse.export``, so the mapping is
computed here from the folders themselves; everything else lives in pyproject.toml.
"""
from setuptools import find_namespace_packages, setup

ROOTS = {"clipfuse.export": "export", "clipfuse.runtime": "runtime", "clipfuse.benchmarks": "benchmarks"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    # Namespace discovery so data-only folders (model_configs/, data/classnames/) are packages too.
    packages.extend(f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"]))

setup(packages=packages, package_dir=ROOTS)
