"""Packaging lives in pyproject.toml. This file ships csrc/*.cu inside the package (as mrl_kernels/_csrc),
so that an installed, non-editable mrl-kernels can still compile its CUDA sources at run time."""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithCudaSources(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "mrl_kernels", "_csrc")
        os.makedirs(target, exist_ok=True)
        for src in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "*.cu")):
            shutil.copy(src, target)


setup(cmdclass={"build_py": BuildWithCudaSources})
