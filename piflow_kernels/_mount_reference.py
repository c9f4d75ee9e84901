"""Mounts ``piflow_kernels.reference`` in a source checkout that is not installed (imported first by the package)."""

from __future__ import annotations

import importlib.util
import os
import sys


def _mount_reference() -> None:
    """Make ``piflow_kernels.reference`` importable from a source checkout that is not installed.

    Installs map the repository's top-level ``reference/`` folder to ``piflow_kernels.reference``
    (pyproject ``package-dir``). A bare checkout on ``PYTHONPATH`` (the GPU check runs so) has no such
    mapping: mount the folder beside the package under the same name, so the library imports it one way.
    """
    name = "piflow_kernels.reference"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_mount_reference()
