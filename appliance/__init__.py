"""appliance: a vfio-user NVMe device and vhost-user-net ports in one process.

``__version__`` is the installed distribution's version (one source: the
package metadata from pyproject.toml); ``"0+unknown"`` when the package runs
from a checkout that was never installed.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("appliance")
except PackageNotFoundError:  # a checkout on sys.path, never installed
    __version__ = "0+unknown"
