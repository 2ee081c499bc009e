"""Certificate files for everything that is not Envoy or a SPIFFE client (nginx, gRPC apps).

``cert-chain.pem``, ``key.pem`` (0600), ``root-cert.pem``, ``bundle.pem`` (the mesh's
trust bundle: all its roots, which change during a root rotation), ``crl.pem`` (the
CA's CRL, empty
until the first arrives; a new CRL is a new generation) and ``federated/<td>.pem`` (each
federated trust domain's roots, :mod:`meshtrust.agent.federated`) are replaced atomically on every
rotation, the way kubelet updates a Secret volume: each generation is written in full into
a fresh hidden directory, then one ``rename()`` swaps the ``..data`` symlink to it. The
visible names are symlinks through ``..data``, so every open sees a complete file
of one generation; a reader that needs a matching *pair* resolves ``..data`` once and reads
both files from there. The previous generation is kept until the next swap, so a reader
that resolved it just before a swap still finds its files.

Expiry is marked, not hidden: when the certificate expires before a fresh one comes,
:meth:`CertificateFiles.mark_expired` writes an ``EXPIRED`` file (what expired, when, and
why no fresh certificate came) into the current generation, atomically (temporary name,
rename), and links it as ``EXPIRED`` beside the three names. The certificate files stay:
an app that holds them keeps working as well as an expired certificate lets it, and
nothing vanishes under a reload. The next fresh generation has no marker; once ``..data``
points at it the link dangles (so ``test -e EXPIRED`` is false at once) and is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from meshtrust.agent.cache import WorkloadSecret
from meshtrust.agent.federated import FEDERATED, write_federated_dir
from meshtrust.errors import ConfigError
from meshtrust.fileio import Fsync, ensure_private_dir, fsync_directory

__all__ = ["CertificateFiles"]

NAMES = ("cert-chain.pem", "key.pem", "root-cert.pem", "bundle.pem", "crl.pem")
DATA = "..data"
#: The marker written into an expired generation (and linked beside NAMES).
EXPIRED = "EXPIRED"


class CertificateFiles:
    """The three files in ``directory``. Every file, the generation directory and the
    ``..data`` swap are fsynced (``fsync`` is the seam tests watch it through), so a power
    loss cannot leave ``..data`` pointing at nothing."""

    def __init__(self, directory: Path, *, fsync: Fsync = os.fsync) -> None:
        self.directory = directory
        self._fsync = fsync

    def prepare(self) -> None:
        """Create the directory. Plain files already there under our names (from another
        tool, or istio-agent) are replaced by our symlinks on the first write. Made 0700; an
        existing one others could write to is refused (they could swap ``..data``)."""
        try:
            ensure_private_dir(self.directory)
        except OSError as exc:
            raise ConfigError(f"output directory {self.directory}: {exc.strerror}") from exc

    def write(self, secret: WorkloadSecret) -> Path:
        """Write ``secret`` as a new generation and switch to it atomically."""
        d = self.directory
        gen_dir = d / f"..gen-{secret.generation:08d}-{os.getpid()}"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)
        gen_dir.mkdir(mode=0o700)
        gen_dir.chmod(0o700)  # whatever the umask
        self._write(gen_dir / "cert-chain.pem", secret.chain_pem(), 0o644)
        self._write(gen_dir / "key.pem", secret.key_pem(), 0o600)
        self._write(gen_dir / "root-cert.pem", secret.roots_pem(), 0o644)
        # The mesh's trust bundle (every root it trusts, as root-cert.pem); federated
        # trust domains' roots will be added here, never to root-cert.pem.
        self._write(gen_dir / "bundle.pem", secret.roots_pem(), 0o644)
        # An empty crl.pem until the first CRL arrives: the link is always there to read.
        self._write(gen_dir / "crl.pem", secret.crl_pem() or b"", 0o644)
        # federated/<td>.pem: each federated trust domain's roots (agent/federated.py).
        write_federated_dir(gen_dir / FEDERATED, secret.federated, self._write)
        fsync_directory(gen_dir, self._fsync)

        previous = os.readlink(d / DATA) if (d / DATA).is_symlink() else None
        tmp_link = d / f"..data_tmp-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(gen_dir.name, tmp_link)
        os.replace(tmp_link, d / DATA)  # the one atomic switch
        for name in (*NAMES, FEDERATED):
            link = d / name
            target = f"{DATA}/{name}"
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = d / f".{name}.link-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        fsync_directory(d, self._fsync)  # the swap itself is durable
        (d / EXPIRED).unlink(missing_ok=True)  # dangling now: the new generation is fresh
        # Keep exactly the previous generation; remove older ones.
        for entry in d.iterdir():
            if entry.name.startswith("..gen-") and entry.name not in (gen_dir.name, previous):
                shutil.rmtree(entry, ignore_errors=True)
        return gen_dir

    def mark_expired(self, text: bytes) -> Path | None:
        """Write ``text`` as ``EXPIRED`` into the current generation and link it as
        ``<directory>/EXPIRED``; None when no generation has been written yet."""
        d = self.directory
        if not (d / DATA).is_symlink():
            return None
        gen_dir = d / os.readlink(d / DATA)
        tmp = gen_dir / f".{EXPIRED}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        self._write(tmp, text, 0o644)
        os.replace(tmp, gen_dir / EXPIRED)
        fsync_directory(gen_dir, self._fsync)
        if not (d / EXPIRED).is_symlink():
            tmp_link = d / f".{EXPIRED}.link-{os.getpid()}"
            tmp_link.unlink(missing_ok=True)
            os.symlink(f"{DATA}/{EXPIRED}", tmp_link)
            os.replace(tmp_link, d / EXPIRED)
            fsync_directory(d, self._fsync)
        return gen_dir / EXPIRED

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        # A fresh file in a fresh directory: O_EXCL, no rename needed (the swap is the rename).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            self._fsync(f.fileno())
        os.chmod(path, mode)
