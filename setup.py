"""Build the kvferry Python package with pip: `pip install --no-build-isolation .`

The extension is built by the project's own CMake (target kvferry_python), for the interpreter
running this script, so there is one build description: the module and the library it links
statically are compiled exactly as `make` compiles them. Needs cmake, a C compiler and the
packages of scripts/deps.sh (libjansson-dev, python3-dev). Build files go to build-pip/, away
from the Makefile's build/.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_BASE = "build-pip"


def version():
    with open(os.path.join(ROOT, "include", "kvferry.h")) as f:
        m = re.search(r'#define KVF_VERSION_STRING "([^"]+)"', f.read())
    return m.group(1)


class CMakeBuildExt(build_ext):
    """Configure the project with CMake and build only the extension module."""

    def build_extension(self, ext):
        cmake_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(cmake_dir, exist_ok=True)
        subprocess.run(["cmake", "-S", ROOT, "-B", cmake_dir,
                        "-DKVF_BUILD_TESTS=OFF", f"-DPython3_EXECUTABLE={sys.executable}"],
                       check=True)
        subprocess.run(["cmake", "--build", cmake_dir, "--target", "kvferry_python", "-j",
                        str(os.cpu_count() or 2)], check=True)
        built = glob.glob(os.path.join(cmake_dir, "python", "kvferry", "_kvferry*.so"))
        if len(built) != 1:
            raise RuntimeError(f"expected one built module in {cmake_dir}, found {built}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built[0], dest)


setup(
    name="kvferry",
    version=version(),
    description="Transfer engine for disaggregated LLM inference (mf_adapter-compatible API)",
    packages=["kvferry"],
    package_dir={"": "python"},
    package_data={"kvferry": ["py.typed", "_kvferry.pyi", "compat/*/*.py"]},
    ext_modules=[Extension("kvferry._kvferry", sources=[])],
    cmdclass={"build_ext": CMakeBuildExt},
    python_requires=">=3.8",
    zip_safe=False,
    options={"build": {"build_base": BUILD_BASE}, "egg_info": {"egg_base": BUILD_BASE}},
)
