"""The repository key (repokey.py): the key check, sealed sidecars (AES-GCM with the
file's path as associated data), and the key files refused.  The check value and the
sealing are recomputed here from their definition (HKDF-SHA256, HMAC-SHA256, AES-GCM)
with the cryptography package, not through the module."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xencbt_cli.errors import RepositoryError, UsageError, WrongKey
from xencbt_cli.repo import repokey

KEY = "0123456789abcdefghijklmnopqrstuvwxyzABCDEF==\n"


def hkdf(material: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


@pytest.fixture
def repo(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    root = tmp_path / "repo"
    root.mkdir()
    key = repokey.load(key_file)
    salt = repokey.new_salt()
    repokey.unlock(root, key, salt, key.check_value(salt))
    yield root, key, salt
    repokey.forget(root)


def test_check_value_is_hmac_of_a_label_under_an_hkdf_key(repo):
    root, key, salt = repo
    expected = hmac.new(
        hkdf(KEY.encode(), salt, b"xencbt key check"),
        b"xencbt repository key check v1",
        hashlib.sha256,
    ).hexdigest()
    assert key.check_value(salt) == expected
    assert KEY.strip() not in expected and KEY.encode().hex() not in expected
    assert key.check_value(repokey.new_salt()) != expected  # a salt per repository


def test_wrong_key_refused(repo, tmp_path):
    root, key, salt = repo
    other = tmp_path / "other"
    other.write_text(KEY.replace("0", "1"))
    with pytest.raises(WrongKey, match="is not the key of repository"):
        repokey.unlock(root, repokey.load(other), salt, key.check_value(salt))


# The fixture is the same for every example: one unlocked repository.
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096))
def test_sealed_sidecar_opens_only_at_its_own_path(repo, data):
    root, key, salt = repo
    path = root / "vm" / "vdi" / "20260101T000000.000000Z.sums"
    blob = repokey.sealed(path, data)
    assert blob.startswith(repokey.MAGIC) and (len(data) < 8 or data not in blob)
    # Independently: AES-256-GCM under the HKDF sidecar key, the path as associated data.
    nonce = blob[len(repokey.MAGIC) : len(repokey.MAGIC) + 12]
    aead = AESGCM(hkdf(KEY.encode(), salt, b"xencbt sidecar aes-256-gcm v1"))
    aad = b"vm/vdi/20260101T000000.000000Z.sums"
    assert aead.decrypt(nonce, blob[len(repokey.MAGIC) + 12 :], aad) == data
    assert repokey.opened(path, blob) == data
    assert repokey.sealed(path, data) != blob  # a fresh nonce each time
    with pytest.raises(RepositoryError, match="does not decrypt"):
        repokey.opened(path.with_name("20260102T000000.000000Z.sums"), blob)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(RepositoryError, match="does not decrypt"):
        repokey.opened(path, bytes(flipped))


def test_clear_sidecar_in_an_encrypted_repository_refused(repo):
    root, _, _ = repo
    with pytest.raises(RepositoryError, match="not encrypted in an encrypted repository"):
        repokey.opened(root / "x.sums", b"clear sums")


def test_sealed_sidecar_without_the_key_refused(repo, tmp_path):
    root, _, _ = repo
    blob = repokey.sealed(root / "a.sums", b"sums")
    elsewhere = tmp_path / "copy" / "a.sums"
    with pytest.raises(RepositoryError, match="give the repository's key file"):
        repokey.opened(elsewhere, blob)
    assert repokey.sealed(elsewhere, b"sums") == b"sums"  # not a repository: clear


@pytest.mark.parametrize(
    "content, why",
    [(b"short", "fewer than 32"), (b"\xff" * 40, "not UTF-8")],
)
def test_weak_or_binary_key_files_refused(tmp_path, content, why):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=why):
        repokey.load(path)
    with pytest.raises(UsageError, match="cannot read the key file"):
        repokey.load(Path(tmp_path / "missing"))


def test_key_never_in_repr(repo):
    _, key, _ = repo
    assert KEY.strip() not in repr(key) and KEY.strip() not in str(key)
