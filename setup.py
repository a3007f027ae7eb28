"""Package discovery. `gptdeploy/` installs as `gptdeploy`; the top-level folders `exporters/` and
`runtimes/` install as its subpackages `gptdeploy.exporters` and `gptdeploy.runtimes` (the layout
the product promises: DESIGN.md). Every subpackage is found here, none is listed by hand; the rest
of the metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

MOUNTED = {"exporters": "gptdeploy.exporters", "runtimes": "gptdeploy.runtimes"}


def _installed_name(found: str) -> str:
    top, _, rest = found.partition(".")
    return MOUNTED[top] + (f".{rest}" if rest else "") if top in MOUNTED else found


def packages() -> list[str]:
    roots = ["gptdeploy", *MOUNTED]
    found = find_packages(include=[*roots, *(f"{r}.*" for r in roots)])
    return sorted(_installed_name(name) for name in found)


setup(packages=packages(), package_dir={name: folder for folder, name in MOUNTED.items()})
