"""Install the wheel into BUILDROOT as EL9's %pyproject_install would (a local stand-in).

pyproject-install.py BUILDROOT SITELIB BINDIR WHEELDIR
"""

import glob
import sys

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

buildroot, sitelib, bindir, wheeldir = sys.argv[1:]
scheme = {
    "purelib": sitelib,
    "platlib": sitelib,
    "headers": "/usr/include/python3",
    "scripts": bindir,
    "data": "/usr",
}
destination = SchemeDictionaryDestination(
    scheme, interpreter="/usr/bin/python3", script_kind="posix", destdir=buildroot
)
(wheel,) = glob.glob(wheeldir + "/*.whl")
with WheelFile.open(wheel) as source:
    install(source, destination, {"INSTALLER": b"rpm\n"})
