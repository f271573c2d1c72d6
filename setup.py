"""One import namespace, `xenpv`, over the design's top-level folders: `harness/` installs as `xenpv.harness`,
`stack/` as `xenpv.stack`, and so on (`harness` and `backends` are also unrelated packages on PyPI).
Everything else about the distribution is in pyproject.toml."""
from setuptools import find_packages, setup

FOLDERS = ("harness", "stack", "backends", "base", "xenabi", "guests")

package_dir = {f"xenpv.{folder}": folder for folder in FOLDERS}
packages = [f"xenpv.{folder}{'.' + sub if sub else ''}"
            for folder in FOLDERS for sub in ["", *find_packages(folder)]]

setup(packages=packages, package_dir=package_dir)
