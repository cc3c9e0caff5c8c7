"""A VM's BIOS strings: the generic set VM.start gives a VM that has none,
VM.set_bios_strings and VM.copy_bios_strings."""

from __future__ import annotations

from .database import Database
from .errors import ServerError

# xapi-consts/constants.ml: ``generic_bios_strings`` (with ``standard_type11_strings``),
# what VM.start gives a VM that has none; ``settable_vm_bios_string_keys``.
GENERIC_BIOS_STRINGS = {
    "bios-vendor": "Xen",
    "bios-version": "",
    "system-manufacturer": "Xen",
    "system-product-name": "HVM domU",
    "system-version": "",
    "system-serial-number": "",
    "baseboard-manufacturer": "",
    "baseboard-product-name": "",
    "baseboard-version": "",
    "baseboard-serial-number": "",
    "baseboard-asset-tag": "",
    "baseboard-location-in-chassis": "",
    "enclosure-asset-tag": "",
    "hp-rombios": "",
    "oem-1": "Xen",
    "oem-2": "MS_VM_CERT/SHA1/bdbeb6e0a816d43fa6d3fe8aaef04c2bad9d3e3d",
}
SETTABLE_BIOS_KEYS = ("bios-vendor", "bios-version", "system-manufacturer")
SETTABLE_BIOS_KEYS += ("system-product-name", "system-version", "system-serial-number")
SETTABLE_BIOS_KEYS += ("baseboard-manufacturer", "baseboard-product-name", "baseboard-version")
SETTABLE_BIOS_KEYS += ("baseboard-serial-number", "baseboard-asset-tag")
SETTABLE_BIOS_KEYS += ("baseboard-location-in-chassis", "enclosure-asset-tag")
BIOS_STRING_LIMIT = 512  # constants.ml bios_string_limit_size


def consider_generic_bios_strings(db: Database, ref: str) -> None:
    """xapi_vm_helpers.ml ``consider_generic_bios_strings``."""
    vm = db.get("VM", ref)
    if not vm["bios_strings"]:
        vm["bios_strings"] = dict(GENERIC_BIOS_STRINGS)


def set_bios_strings(db: Database, ref: str, value: dict) -> None:
    """xapi_vm.ml ``set_bios_strings``: only while the VM has none
    (VM_BIOS_STRINGS_ALREADY_SET []); each key settable and each value 1..512
    printable ASCII characters (xapi_vm_helpers.ml ``assert_valid_bios_strings``:
    INVALID_VALUE [key, why]); the VM gets the generic strings with these in place."""
    vm = db.get("VM", ref)
    if vm["bios_strings"]:
        raise ServerError("VM_BIOS_STRINGS_ALREADY_SET")
    for key, text in value.items():
        if key not in SETTABLE_BIOS_KEYS:
            raise ServerError("INVALID_VALUE", key, "Unknown key")
        if not text:
            raise ServerError("INVALID_VALUE", key, "Value provided is empty")
        if len(text) > BIOS_STRING_LIMIT:
            why = "%s has length more than %d characters" % (text, BIOS_STRING_LIMIT)
            raise ServerError("INVALID_VALUE", key, why)
        if any(not 32 <= ord(ch) < 127 for ch in text):
            raise ServerError("INVALID_VALUE", key, text + " has non-printable ASCII characters")
    vm["bios_strings"] = {k: value.get(k, v) for k, v in GENERIC_BIOS_STRINGS.items()}


def copy_bios_strings(db: Database, ref: str, host: str) -> None:
    """xapi_vm_helpers.ml ``copy_bios_strings``: the host's (OEM) strings, only while
    the VM has none; the VM's affinity becomes the host."""
    vm = db.get("VM", ref)
    host_strings = dict(db.get("host", host).get("bios_strings", {}))
    if vm["bios_strings"]:
        raise ServerError("VM_BIOS_STRINGS_ALREADY_SET")
    vm.update(bios_strings=host_strings, affinity=host)
