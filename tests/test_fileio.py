"""Files users trust us with: keys never on disk outside key.pem, renames made durable.

Defect 10 (key material handed to ``ssl`` through a temporary file) and defect 11 (no
directory fsync after the rename) of issue 8.
"""

from __future__ import annotations

import errno
import json
import os
import ssl
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshtrust.agent.cache import WorkloadSecret
from meshtrust.agent.files import DATA, CertificateFiles
from meshtrust.clock import SystemClock
from meshtrust.envoy.sidecar import write_lds_file
from meshtrust.fileio import (
    UnsafeDirectory,
    check_not_writable_by_others,
    create_private_file,
    ensure_private_dir,
    load_cert_chain_pem,
    open_log,
    write_file_atomic,
    write_private_file,
)
from meshtrust.spiffe import SpiffeId
from tests import badcerts

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


# --- defect 10: the key goes to ssl through memory -------------------------------------------


class WatchedContext(ssl.SSLContext):
    """An SSLContext that notes what ``load_cert_chain`` was given and what the temp
    directory held at that moment (the only time a temporary key file could exist)."""

    temp_dir: Path
    seen: list[tuple[str, str | None, list[str]]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        self.seen.append(
            (str(certfile), keyfile and str(keyfile), sorted(os.listdir(self.temp_dir)))
        )
        super().load_cert_chain(certfile, keyfile, password)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A real TLS handshake between two contexts over memory BIOs; returns the client end."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_end = client.wrap_bio(c_in, c_out)
    server_end = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client_end), ("server", server_end)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client_end
    raise AssertionError("the handshake did not finish")


def test_key_reaches_ssl_through_memory_and_serves_a_real_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    now = SystemClock().now()
    ca = badcerts.make_ca("example.org", now=now)
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=now)

    server = WatchedContext(ssl.PROTOCOL_TLS_SERVER)
    server.temp_dir, server.seen = temp_dir, []
    load_cert_chain_pem(server, leaf.chain_pem, leaf.key_pem)

    (certfile, keyfile, listing) = server.seen[0]
    assert listing == [] and os.listdir(temp_dir) == []
    assert keyfile is not None and keyfile.startswith("/proc/self/fd/")
    assert certfile.startswith("/proc/self/fd/")

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # a SPIFFE leaf has a URI SAN, no host name
    client.load_verify_locations(cadata=badcerts.cert_pem(ca.root).decode())
    end = _handshake(server, client)
    peer = end.getpeercert(binary_form=True)
    assert peer == leaf.der


def test_bad_key_pem_is_an_ssl_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    now = SystemClock().now()
    leaf = badcerts.svid_leaf(badcerts.make_ca("example.org", now=now).signer, WEB, now=now)
    with pytest.raises(ssl.SSLError):
        load_cert_chain_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), leaf.chain_pem, b"junk")
    assert os.listdir(tmp_path) == []


# --- defect 11: renames are followed by a directory fsync -------------------------------------


@dataclass
class FsyncLog:
    """An ``fsync`` that records what it synced (directory or file, which inode) and, for
    directories, what ``watch`` says at that moment; then really syncs."""

    watch: Path | None = None
    calls: list[tuple[bool, int, object]] = field(default_factory=list)

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        is_dir = stat.S_ISDIR(st.st_mode)
        state: object = None
        if is_dir and self.watch is not None:
            state = self.watch.read_bytes() if self.watch.exists() else None
        self.calls.append((is_dir, st.st_ino, state))
        os.fsync(fd)

    def directories(self) -> list[tuple[int, object]]:
        return [(ino, state) for is_dir, ino, state in self.calls if is_dir]


@pytest.mark.parametrize("writer", [write_file_atomic, write_private_file])
def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path: Path, writer: Any) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    log = FsyncLog(watch=target)
    writer(target, b"new", fsync=log)
    assert target.read_bytes() == b"new"
    # The file first, then its directory — once the new content is in place under its name.
    assert [is_dir for is_dir, _, _ in log.calls] == [False, True]
    assert log.directories() == [(tmp_path.stat().st_ino, b"new")]


def test_lds_file_write_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "lds" / "listeners.json"
    path.parent.mkdir()
    log = FsyncLog(watch=path)
    write_lds_file(path, [{"name": "inbound"}], "7", fsync=log)
    ((ino, state),) = log.directories()
    assert ino == path.parent.stat().st_ino
    assert isinstance(state, bytes) and json.loads(state)["version_info"] == "7"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it names the RBAC principals


def test_certificate_files_fsync_the_data_swap(tmp_path: Path) -> None:
    now = SystemClock().now()
    ca = badcerts.make_ca("example.org", now=now)
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=now)
    secret = WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), now, generation=1)
    out = tmp_path / "certs"
    log = FsyncLog(watch=out / "cert-chain.pem")
    files = CertificateFiles(out, fsync=log)
    files.prepare()
    gen_dir = files.write(secret)
    # Five files (bundle.pem and crl.pem too), the generation directory, then the output
    # directory after the swap, when the visible names already lead to the new generation.
    assert [is_dir for is_dir, _, _ in log.calls] == [False] * 5 + [True, True]
    (gen_ino, _), (last_ino, last_state) = log.directories()
    assert gen_ino == gen_dir.stat().st_ino
    assert last_ino == out.stat().st_ino
    assert last_state == leaf.chain_pem
    assert os.readlink(out / DATA) == gen_dir.name


def _directory_fsync_failing_with(code: int) -> FsyncLog:
    class Failing(FsyncLog):
        def __call__(self, fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            super().__call__(fd)

    return Failing()


def test_a_filesystem_that_cannot_sync_directories_is_accepted(tmp_path: Path) -> None:
    target = tmp_path / "root-cert.pem"
    write_file_atomic(target, b"roots", 0o644, fsync=_directory_fsync_failing_with(errno.EINVAL))
    assert target.read_bytes() == b"roots"


def test_a_failing_directory_sync_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="Input/output error"):
        write_file_atomic(
            tmp_path / "key.pem", b"k", fsync=_directory_fsync_failing_with(errno.EIO)
        )


# -- modes whatever the umask (issue 9, point 6)


@pytest.fixture
def umask_000() -> Any:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_private_dirs_logs_and_files_keep_their_modes_under_umask_000(
    tmp_path: Path, umask_000: None
) -> None:
    deep = tmp_path / "a" / "b" / "c"
    ensure_private_dir(deep)
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", deep)] == [0o700] * 3
    with open_log(deep / "x.log") as log:
        log.write(b"one\n")
    assert _mode(deep / "x.log") == 0o600
    create_private_file(deep / "ledger.db")
    assert _mode(deep / "ledger.db") == 0o600


def test_an_earlier_more_open_log_or_file_of_ours_is_tightened(tmp_path: Path) -> None:
    for name in ("x.log", "ledger.db"):
        (tmp_path / name).write_bytes(b"kept\n")
        (tmp_path / name).chmod(0o644)
    with open_log(tmp_path / "x.log") as log:
        log.write(b"more\n")
    create_private_file(tmp_path / "ledger.db")
    assert (tmp_path / "x.log").read_bytes() == b"kept\nmore\n"
    assert (tmp_path / "ledger.db").read_bytes() == b"kept\n"  # never truncated
    assert _mode(tmp_path / "x.log") == _mode(tmp_path / "ledger.db") == 0o600


@pytest.mark.parametrize(("mode", "who"), [(0o770, "group members"), (0o707, "other users")])
def test_an_existing_directory_others_can_write_is_refused(
    tmp_path: Path, mode: int, who: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(UnsafeDirectory, match=f"writable by {who} \\(mode 0{mode:o}\\)"):
        ensure_private_dir(shared)
    assert _mode(shared) == mode  # a user's directory is not changed behind their back
    ensure_private_dir(shared, tighten=True)  # one of meshtrust's own is tightened
    assert _mode(shared) == 0o700


def test_a_sticky_or_read_only_existing_directory_is_kept_as_it_is(tmp_path: Path) -> None:
    readable, sticky = tmp_path / "readable", tmp_path / "sticky"
    for path, mode in ((readable, 0o755), (sticky, 0o1777)):
        path.mkdir()
        path.chmod(mode)
        ensure_private_dir(path)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    check_not_writable_by_others(sticky)  # a Kubernetes secret mount looks like this


def test_certificate_generations_are_private_under_umask_000(
    tmp_path: Path, umask_000: None
) -> None:
    now = SystemClock().now()
    ca = badcerts.make_ca("example.org", now=now)
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=now)
    secret = WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), now, generation=1)
    files = CertificateFiles(tmp_path / "certs", fsync=lambda fd: None)
    files.prepare()
    gen_dir = files.write(secret)
    assert _mode(tmp_path / "certs") == _mode(gen_dir) == 0o700
    assert _mode(gen_dir / "key.pem") == 0o600
    assert _mode(gen_dir / "cert-chain.pem") == _mode(gen_dir / "root-cert.pem") == 0o644


def test_a_certs_directory_others_can_write_is_refused_by_the_agent(tmp_path: Path) -> None:
    """Whoever can write there could point ``..data`` at certificates of their own."""
    out = tmp_path / "certs"
    out.mkdir()
    out.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="writable by group members and other users"):
        CertificateFiles(out).prepare()


def test_a_ca_directory_others_can_write_is_refused_when_loaded(tmp_path: Path) -> None:
    """Whoever can write there could swap ``root-cert.pem`` (issue 9, point 6)."""
    from meshtrust.ca.cadir import init_ca_dir, load_ca_dir
    from meshtrust.spiffe import TrustDomain

    now = SystemClock().now()
    ca = tmp_path / "ca"
    init_ca_dir(ca, TrustDomain("example.org"), now)
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    load_ca_dir(ca, now)
    ca.chmod(0o757)
    with pytest.raises(UnsafeDirectory, match=r"writable by other users \(mode 0757\)"):
        load_ca_dir(ca, now)
    ca.chmod(0o1777)  # sticky, as a Kubernetes secret mount: nobody else can swap a file
    load_ca_dir(ca, now)
