"""The build of the native fast path (everything else is in pyproject.toml).

``pip install -e .`` (or ``python setup.py build_ext --inplace``) compiles
``appliance._fastpath`` from native/fastpath/*.c with the Python headers and a
C11 compiler, nothing else.  The extension is optional: when it does not build,
the install still succeeds and the appliance runs its pure-Python data path
(appliance/fastpath.py decides; the test suite fails on a missing build).
"""

from setuptools import Extension, setup

SOURCES = ["native/fastpath/module.c", "native/fastpath/netrx.c", "native/fastpath/vring.c",
           "native/fastpath/nvmeq.c", "native/fastpath/nvme_module.c", "native/fastpath/nvme_poll.c",
           "native/fastpath/nvme_loadgen.c",
           "native/fastpath/netswitch.c", "native/fastpath/switch_module.c",
           "native/fastpath/guard.c"]

setup(ext_modules=[Extension(
    "appliance._fastpath",
    sources=SOURCES,
    depends=["native/fastpath/vring.h", "native/fastpath/netrx.h", "native/fastpath/nvmeq.h",
             "native/fastpath/held.h", "native/fastpath/netswitch.h",
             "native/fastpath/guard.h"],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    optional=True,
)])
