"""The article's own custom CA ("best practice 1", its ``setup-custom-ca.sh``), made by the
article's commands as written.

Step 3 of the script puts the files into the ``cacerts`` secret that Istio mounts::

    kubectl create secret generic cacerts -n istio-system \\
      --from-file=ca-cert.pem --from-file=ca-key.pem \\
      --from-file=cert-chain.pem=ca-cert.pem --from-file=root-cert.pem=ca-cert.pem

so the signing CA is the root itself, under four names. :data:`PLUG_IN` makes the same four
files in a directory (the secret as mounted), which is what ``ca.dir`` / ``--ca-dir`` reads.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["ARTICLE", "PLUG_IN", "make_article_ca"]

#: setup-custom-ca.sh steps 1 and 2, as the article writes them.
ARTICLE = [
    "openssl genrsa -out ca-key.pem 4096",
    "openssl req -x509 -new -nodes -key ca-key.pem -days 3650 -out ca-cert.pem "
    '-subj "/CN=My-Cluster-CA/O=My-Organization"',
]

#: Step 3's secret as files: ``cert-chain.pem=ca-cert.pem``, ``root-cert.pem=ca-cert.pem``.
PLUG_IN = [
    "cp ca-cert.pem cert-chain.pem",
    "cp ca-cert.pem root-cert.pem",
]


def make_article_ca(directory: Path) -> Path:
    """Run the article's commands in ``directory`` (made if missing); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for command in (*ARTICLE, *PLUG_IN):
        subprocess.run(command, shell=True, cwd=directory, check=True, capture_output=True)
    return directory
