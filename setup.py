"""Package layout (metadata lives in pyproject.toml).

The repository keeps ``cli/`` and ``recipes/`` at its root; installed, they live under the project's
name (``surgery_cli``, ``surgery_recipes``) so that a wheel never adds a generic top-level ``cli``
package to site-packages. pyproject.toml cannot combine package discovery with renamed packages,
hence this file."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["surgery", "surgery.*"]), "surgery_cli", "surgery_recipes"],
    package_dir={"surgery_cli": "cli", "surgery_recipes": "recipes"},
    package_data={"surgery_recipes": ["*.yaml"]},
)
