"""Node identity on disk: created once with mode 0600, reloaded unchanged, refused when unsafe."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from p2pmega import identity as identity_module
from p2pmega.core import crypto
from p2pmega.errors import BadOption, UsageError
from p2pmega.identity import IDENTITY_FILE_NAME, Identity, load_or_create_identity

pytestmark = pytest.mark.integration


def test_first_run_creates_identity_with_private_modes(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "data"
    ident = load_or_create_identity(data_dir)
    path = data_dir / IDENTITY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert len(ident.seed) == crypto.SEED_BYTES
    assert ident.public_key == crypto.public_key_of(ident.seed)
    assert ident.node_id == crypto.node_id_of(ident.public_key)
    assert len(ident.node_id) == 20
    document = json.loads(path.read_text("utf-8"))
    assert document == {"version": 1, "ed25519_seed": base64.b64encode(ident.seed).decode()}
    # Only the identity file is left: the temporary file was removed.
    assert sorted(p.name for p in data_dir.iterdir()) == [IDENTITY_FILE_NAME]


def test_reload_gives_the_same_identity(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    second = load_or_create_identity(tmp_path)
    assert second == first
    assert second.node_id == first.node_id


def test_identity_signs_verifiably(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    sig = crypto.sign(ident.seed, b"p2pmega:test:v1 hello")
    crypto.verify_signature(ident.public_key, b"p2pmega:test:v1 hello", sig)


def test_repr_hides_the_seed(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    text = repr(ident)
    assert "seed" not in text
    assert repr(ident.seed) not in text
    assert ident.seed.hex() not in text
    assert ident.node_id.hex() in text or repr(ident.node_id) in text


def test_existing_data_dir_is_not_chmodded(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_identity(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_file_open_to_others(tmp_path: Path, mode: int) -> None:
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE_NAME
    path.chmod(mode)
    with pytest.raises(BadOption, match=r"chmod 600") as info:
        load_or_create_identity(tmp_path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2
    # After the fix the user was told to apply, it loads again.
    path.chmod(0o600)
    load_or_create_identity(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe garbage",
        b"not json",
        b"[1, 2]",
        b'{"ed25519_seed": "AAAA"}',
        b'{"version": true, "ed25519_seed": "AAAA"}',
        b'{"version": 1}',
        b'{"version": 1, "ed25519_seed": 5}',
        b'{"version": 1, "ed25519_seed": "!!not base64!!"}',
        b'{"version": 1, "ed25519_seed": "' + base64.b64encode(b"x" * 31) + b'"}',
        b'{"version": 1, "ed25519_seed": "' + base64.b64encode(b"x" * 33) + b'"}',
        b" " * 5000,
    ],
)
def test_corrupt_file_is_refused_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / IDENTITY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    with pytest.raises(BadOption) as info:
        load_or_create_identity(tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    # The broken file is left for the user to inspect, never overwritten.
    assert path.read_bytes() == content


def test_unknown_version_asks_for_upgrade(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write('{"version": 2, "ed25519_seed": "whatever"}')
    with pytest.raises(BadOption, match=r"unsupported version 2; upgrade p2pmega"):
        load_or_create_identity(tmp_path)


def test_error_messages_never_contain_the_seed(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE_NAME
    encoded = base64.b64encode(ident.seed).decode()
    path.write_text(json.dumps({"version": 1, "ed25519_seed": encoded + "="}))
    with pytest.raises(BadOption) as info:
        load_or_create_identity(tmp_path)
    assert encoded not in str(info.value)
    assert info.value.__cause__ is None


def test_directory_in_place_of_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE_NAME).mkdir()
    with pytest.raises(BadOption, match=r"not a regular file"):
        load_or_create_identity(tmp_path)


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(BadOption, match=r"check --data-dir"):
        load_or_create_identity(not_a_dir)


def test_losing_a_creation_race_loads_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic race: another process creates the file between our load and our link."""
    real_load = identity_module._load
    winner: list[Identity] = []

    def load_then_someone_else_creates(path: Path) -> Identity:
        monkeypatch.setattr(identity_module, "_load", real_load)
        try:
            return real_load(path)
        finally:
            winner.append(identity_module.load_or_create_identity(tmp_path))

    monkeypatch.setattr(identity_module, "_load", load_then_someone_else_creates)
    ident = identity_module.load_or_create_identity(tmp_path)
    assert ident == winner[0]
    assert load_or_create_identity(tmp_path) == ident
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE_NAME]


def _create_in_child(data_dir: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=20)
    results.put(load_or_create_identity(Path(data_dir)).node_id.hex())


def test_concurrent_first_runs_agree_on_one_identity(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_create_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(3)
    ]
    for child in children:
        child.start()
    try:
        ids = [results.get(timeout=20) for _ in children]
    finally:
        for child in children:
            child.join(timeout=20)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert len(set(ids)) == 1
    assert load_or_create_identity(tmp_path).node_id.hex() == ids[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE_NAME]
