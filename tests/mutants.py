"""``make mutants``: plant known bugs in a scratch copy of the tree, one at a time, and show
that the default test suite catches each (issue #18).

For each mutant: a fresh copy of the checkout (tracked and new files, not .venv) in a
scratch directory, one small patch applied (it must apply exactly once), then the test
that catches it (each mutant names it), run with this checkout's venv and the copy first
on PYTHONPATH (so the copy's product code runs, in the tests' process and in every xencbt
and plugin they start).  The same tests first run on an unplanted copy and must pass
(else exit 2).  A mutant is caught when pytest exits non-zero; one that survives makes
this script exit 1.  Run ``python tests/mutants.py [NAME...]``.  tests/test_mutants.py
(part of ``make check``) asserts in milliseconds that every patch still applies exactly
once and every named test exists, so this script cannot rot unseen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ROOT / ".venv" / "bin" / "pytest"
PACKAGES = ("orchestrate", "plugin", "simulator")  # where the importable code lives


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        # the plugin's block status (what qemu-img convert -B copies), not the bitmap
        # arithmetic: the digest then re-hashes the corrupt image and verify passes
        "one-block changes reported as holes",
        "plugin/xencbt_core/export.py",
        "        return self._spans(offset, count, 1 if one else MAX_EXTENTS, types)\n",
        "        spans = self._spans(offset, count, 1 if one else MAX_EXTENTS, types)\n"
        "        return [(o, n, self.unchanged_type if n <= BLOCK_SIZE else t)"
        " for o, n, t in spans]\n",
        ("tests/test_cli_serve.py::test_points_served_byte_identical_then_cleaned_up",),
    ),
    Mutant(
        "accept any NBD certificate",
        "plugin/xencbt_core/trust.py",
        '        """Raise TrustError unless the presented certificate is the expected one."""\n',
        '        """Raise TrustError unless the presented certificate is the expected one."""\n'
        "        return\n",
        ("tests/test_plugin_trust.py::test_other_certificate_is_refused_before_the_export_name",),
    ),
    Mutant(
        "manifest written before its sums in repository.commit",
        "orchestrate/xencbt_cli/repo/repository.py",
        "        if sums is not None:\n"
        "            path = self.sums_path(manifest.point)\n"
        "            write_atomically(path, repokey.sealed(path, sums))  # they reveal content\n"
        "        write_atomically(self.manifest_path(manifest.point), manifest.to_json())\n",
        "        write_atomically(self.manifest_path(manifest.point), manifest.to_json())\n"
        "        if sums is not None:\n"
        "            path = self.sums_path(manifest.point)\n"
        "            write_atomically(path, repokey.sealed(path, sums))  # they reveal content\n",
        ("tests/test_crash_backup.py::test_backup_killed[sums]",),
    ),
    Mutant(
        "snapshot VMs not cleaned",
        "orchestrate/xencbt_cli/jobs/backup.py",
        "                self.pool.destroy_snapshot(ref, keep=needed)\n"
        "            except CleanupLagged",
        "                pass\n            except CleanupLagged",
        ("tests/test_crash_backup.py::test_backup_killed[snapshot]",),
    ),
    # Issue #23's properties on the paths no test looked at (each its own, named after it).
    Mutant(
        "copy's incrementals written clear into an encrypted repository",
        "orchestrate/xencbt_cli/repo/image.py",
        "    into = target(out, virtual_size(path), base)\n",
        "    into = None\n",
        (
            "tests/test_copy_invariants.py::"
            "test_copy_of_a_clear_repository_into_an_encrypted_one_is_luks_throughout",
        ),
    ),
    Mutant(
        "copy's incrementals written uncompressed into a zstd repository",
        "orchestrate/xencbt_cli/repo/image.py",
        "    options = compress_options(compression)\n    source, name = opening(path)\n"
        "    into = target(out, virtual_size(path), base)\n",
        "    options = []\n    source, name = opening(path)\n"
        "    into = target(out, virtual_size(path), base)\n",
        ("tests/test_copy_invariants.py::test_copy_into_a_zstd_repository_compresses_every_image",),
    ),
    Mutant(
        "copy writes a manifest before its image is in place",
        "orchestrate/xencbt_cli/jobs/replicate.py",
        '        testhook.pause("copy-checked")\n',
        '        dst.commit(m)\n        testhook.pause("copy-checked")\n',
        ("tests/test_crash_copy.py::test_copy_killed[image checked]",),
    ),
    Mutant(
        "copy writes a manifest before its sums",
        "orchestrate/xencbt_cli/jobs/replicate.py",
        "        dst.commit(copy, sums)\n",
        "        dst.commit(copy)\n        dst.commit(copy, sums)\n",
        ("tests/test_crash_copy.py::test_copy_killed[sums]",),
    ),
    Mutant(
        "copy stops every chain at the first damaged one",
        "orchestrate/xencbt_cli/jobs/replicate.py",
        "                    break  # its later points need this one\n",
        "                    return copied, held\n",
        (
            "tests/test_copy_invariants.py::"
            "test_copy_refuses_a_damaged_source_point_full_or_incremental",
        ),
    ),
    Mutant(
        "copy blames the source for a damaged target chain",
        "orchestrate/xencbt_cli/jobs/replicate.py",
        "            if onto is None or not reads_as_recorded(m, src.image_path(m.point)):\n",
        "            if True:\n",
        (
            "tests/test_copy_invariants.py::"
            "test_a_damaged_target_chain_holds_back_that_chain_alone_and_full_copies_past_it",
        ),
    ),
    Mutant(
        "restore-vm drops the VM's other_config",
        "orchestrate/xencbt_cli/jobs/vm_builder.py",
        '        record["other_config"] = '
        '{**saved.get("other_config", {}), **self.tags, MARK: self.mark}\n',
        '        record["other_config"] = {**self.tags, MARK: self.mark}\n',
        (
            "tests/test_restore_vm_fields.py::"
            "test_restore_vm_gives_back_every_field_of_the_configuration",
        ),
    ),
    Mutant(
        "VM point takes order and delays from the snapshot (reset there)",
        "orchestrate/xencbt_cli/xapi/vmconfig.py",
        'FROM_LIVE = ("order", "start_delay", "shutdown_delay")\n',
        "FROM_LIVE = ()\n",
        (
            "tests/test_restore_vm_fields.py::"
            "test_restore_vm_gives_back_every_field_of_the_configuration",
        ),
    ),
    Mutant(
        "vm= renumbers userdevices 0, 1, ...",
        "plugin/xencbt_core/vmexport.py",
        "        return dict(sorted(found.items(), key=lambda kv: _device_order(kv[0])))\n",
        "        ordered = sorted(found.values(), key=lambda d: _device_order(d.userdevice))\n"
        "        for n, d in enumerate(ordered):\n"
        "            d.userdevice = str(n)\n"
        "        return {d.userdevice: d for d in ordered}\n",
        (
            "tests/test_vm_userdevices.py::"
            "test_plugin_exports_disks_at_userdevices_1_and_3_by_those_names",
        ),
    ),
    Mutant(
        "a named VDI resolves to the first chain in uuid order",
        "orchestrate/xencbt_cli/repo/repository.py",
        "        matches = [c for c in self.chains() if c.vdi_uuid.startswith(vdi)]\n",
        "        matches = [c for c in self.chains() if c.vdi_uuid.startswith(vdi)]\n"
        "        matches = self.chains()[: len(matches)]\n",
        ("tests/test_cli_backup.py::test_verify_names_the_corrupted_point",),
    ),
    # Issue #23: the repository's invariants, each a property some path could break while
    # the paths a test looks at keep it.  (A name becomes a directory on PYTHONPATH: no
    # colon in it.)
    Mutant(
        "invariant zstd - prune rewrite keeps the repository compression",
        "orchestrate/xencbt_cli/jobs/prune.py",
        '    return config.compression if config else "none"\n',
        '    return "none"\n',
        ("tests/test_invariants.py::test_verify_names_an_uncompressed_image_in_a_zstd_repository",),
    ),
    Mutant(
        "invariant luks - a rewritten image of an encrypted repository stays LUKS",
        "orchestrate/xencbt_cli/repo/image.py",
        '    into = target(out, virtual_size(path)) if fmt == "qcow2" else None\n',
        "    into = None\n",
        ("tests/test_cli_encrypt.py::test_encrypted_chain_backs_up_restores_verifies_prunes",),
    ),
    Mutant(
        "invariant modes - files 0600 whatever the umask",
        "orchestrate/xencbt_cli/repo/layout.py",
        "        os.fchmod(fd, PRIVATE_FILE)  # a tmp file left by an older run may be 0644\n",
        "        os.fchmod(fd, 0o644)\n",
        ("tests/test_invariants.py::test_verify_names_open_modes_and_repair_mends_them",),
    ),
    Mutant(
        "invariant luks - verify fails a clear image in an encrypted repository",
        "orchestrate/xencbt_cli/repo/invariants.py",
        "    if config is not None and config.encrypted and not luks:\n",
        "    if False:\n",
        ("tests/test_invariants.py::test_verify_names_a_clear_image_in_an_encrypted_repository",),
    ),
    Mutant(
        "invariant sums - repair never makes up sums for a damaged image",
        "orchestrate/xencbt_cli/repo/mend.py",
        "    if size != m.virtual_size or digest.combine(found, size) != m.digest:\n",
        "    if size != m.virtual_size:\n",
        (
            "tests/test_invariants.py::"
            "test_repair_rebuilds_a_missing_sums_only_from_an_intact_image[clear]",
        ),
    ),
    Mutant(
        # each worker would hold only its own 16 per host: three proxies open 48 on a host
        "cluster run without the cluster-wide budget",
        "orchestrate/xencbt_cli/jobs/cluster_task.py",
        "            budget=ClusterBudget(),\n",
        "            budget=None,\n",
        ("tests/test_cluster.py::test_eight_vms_on_three_workers_hold_each_hosts_budget",),
    ),
]


def copy_tree(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def plant(copy: Path, m: Mutant) -> None:
    path = copy / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit("mutant %r no longer applies to %s: update it" % (m.name, m.path))
    path.write_text(text.replace(m.old, m.new))


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(copy / p) for p in PACKAGES]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("XENCBT_PLUGIN", None)
    return env


def imports_the_copy(copy: Path, env: dict[str, str], m: Mutant) -> bool:
    """The planted module is the one a test run imports (not the checkout's editable one)."""
    if not m.path:  # the baseline: any product module
        return imports_the_copy(copy, env, MUTANTS[0])
    module = m.path.split("/", 1)[1].removesuffix(".py").replace("/", ".")
    code = "import %s as m; print(m.__file__)" % module
    python = ROOT / ".venv" / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", code], cwd=copy, env=env, capture_output=True, text=True
    ).stdout
    return out.strip().startswith(str(copy))


def run(m: Mutant, scratch: Path, planted: bool = True) -> tuple[bool, str]:
    copy = scratch / m.name.replace(" ", "-")
    copy_tree(copy)
    if planted:
        plant(copy, m)
    env = environment(copy)
    if not imports_the_copy(copy, env, m):
        raise SystemExit("%s: the tests would not run the planted code" % m.name)
    t0 = time.monotonic()
    done = subprocess.run(
        [str(PYTEST), "-x", "-q", "-p", "no:cacheprovider", *m.tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    detail = "exit %d in %.0f s; %s" % (
        done.returncode,
        time.monotonic() - t0,
        failed[0] if failed else done.stdout.strip().splitlines()[-1:],
    )
    shutil.rmtree(copy, ignore_errors=True)
    return done.returncode != 0, detail


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="xencbt-mutants-") as scratch:
        # First the same tests on an unplanted copy: they must pass, or a "caught" below
        # would prove nothing.
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        failed, detail = run(Mutant("baseline", "", "", "", tests), Path(scratch), False)
        print("%-55s %s  (%s)" % ("no bug planted", "FAILS" if failed else "passes", detail))
        if failed:
            return 2
        for m in chosen:
            caught, detail = run(m, Path(scratch))
            survivors += not caught
            print("%-55s %s  (%s)" % (m.name, "CAUGHT" if caught else "SURVIVED", detail))
            print("%55s by %s" % ("", " ".join(m.tests)), flush=True)
    print("%d of %d planted bugs caught" % (len(chosen) - survivors, len(chosen)))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
