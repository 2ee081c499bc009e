"""``meshtrust injector``: the sidecar-injecting admission webhook, and its serving
certificate signed by the meshtrust CA."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from urllib.parse import quote

import click

from meshtrust.cli.options import DURATION

__all__ = ["injector"]


@click.group()
def injector() -> None:
    """Add the meshtrust sidecar to pods, as Istio's injector does (sidecar.istio.io/inject)."""


@injector.command("serve")
@click.option("--listen", default="0.0.0.0:9443", show_default=True, help="HTTPS address.")
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Serving certificate chain (PEM), e.g. from `meshtrust injector cert`; re-read when "
    "it changes (a Secret update), no restart needed.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Its private key (PEM).",
)
@click.option(
    "--kube",
    "kube_source",
    default="in-cluster",
    show_default=True,
    metavar="in-cluster|KUBECONFIG",
    help="Where to read namespace labels.",
)
@click.option("--image", required=True, help="The meshtrust image the sidecar runs.")
@click.option(
    "--ca-address",
    default="meshtrust-ca.meshtrust-system.svc:15012",
    show_default=True,
    help="The CA address injected agents use.",
)
@click.option("--ca-server-name", help="Name the agents expect in the CA's certificate.")
@click.option(
    "--root-configmap",
    default="meshtrust-ca-root-cert",
    show_default=True,
    help="ConfigMap (in each pod's namespace) holding the CA's root-cert.pem.",
)
@click.option(
    "--publish-root",
    "publish_root",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Keep this CA root bundle (PEM) in the --root-configmap ConfigMap of every namespace, "
    "re-read on each pass, as istiod does for istio-ca-root-cert. Without it, "
    "create the ConfigMap in each namespace yourself.",
)
@click.option(
    "--publish-interval",
    type=click.FloatRange(min=0.5),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between --publish-root passes (a new namespace gets the ConfigMap within it).",
)
def serve(
    listen: str,
    tls_cert: Path,
    tls_key: Path,
    kube_source: str,
    image: str,
    ca_address: str,
    ca_server_name: str | None,
    root_configmap: str,
    publish_root: Path | None,
    publish_interval: float,
) -> None:
    """Serve the mutating admission webhook (POST /inject) until SIGTERM/SIGINT."""
    import signal

    from meshtrust.config import parse_host_port
    from meshtrust.errors import ConfigError
    from meshtrust.injector import InjectorServer, InjectorSettings, NamespaceLabelCache
    from meshtrust.injector.server import ReloadingTlsContext
    from meshtrust.kube import KubeClient, load_kube_source

    host, port = parse_host_port(listen, what="--listen")
    parse_host_port(ca_address, what="--ca-address")
    settings = InjectorSettings(
        image=image,
        ca_address=ca_address,
        ca_server_name=ca_server_name,
        root_configmap=root_configmap,
    )
    try:
        tls = ReloadingTlsContext(tls_cert, tls_key)
    except ConfigError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None
    client = KubeClient(load_kube_source(kube_source, os.environ))

    def fetch(namespace: str) -> dict[str, object]:
        return client.request("GET", f"/api/v1/namespaces/{quote(namespace, safe='')}")

    publisher = None
    if publish_root is not None:
        from meshtrust.injector.rootpublisher import RootPublisher, read_root_bundle

        read_root_bundle(publish_root)  # a bad file stops the start, with its reason
        publisher = RootPublisher(client, publish_root, root_configmap, publish_interval)
    server = InjectorServer(host, port, tls, NamespaceLabelCache(fetch), settings)
    signal.signal(signal.SIGTERM, lambda *_: server.stop_soon())
    click.echo(f"meshtrust injector serving on https://{host}:{server.port}/inject", err=True)
    if publisher is not None:
        publisher.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if publisher is not None:
            publisher.stop()


@injector.command("cert")
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The meshtrust CA directory whose signing CA signs the certificate.",
)
@click.option(
    "--dns",
    "names",
    multiple=True,
    required=True,
    metavar="NAME",
    help="DNS name of the webhook Service (repeatable), e.g. "
    "meshtrust-injector.meshtrust-system.svc",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for tls.crt, tls.key and ca.crt (the webhook's caBundle).",
)
@click.option("--ttl", type=DURATION, default="365d", show_default=True)
def cert(ca_dir: Path, names: tuple[str, ...], out: Path, ttl: dt.timedelta) -> None:
    """Sign the webhook's serving certificate with the meshtrust CA (offline, at deploy
    time): the API server then trusts it through the CA's root, the caBundle."""
    from meshtrust.ca.cadir import load_ca_dir
    from meshtrust.clock import SystemClock
    from meshtrust.fileio import write_file_atomic, write_private_file
    from meshtrust.pki import KeyType, certs_pem, generate_key, make_serving_cert, private_key_pem

    now = SystemClock().now()
    material = load_ca_dir(ca_dir, now)
    key = generate_key(KeyType.EC_P256)
    leaf = make_serving_cert(material.signer, key, list(names), now, ttl)
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "tls.crt", certs_pem([leaf, *material.intermediates]), 0o644)
    write_private_file(out / "tls.key", private_key_pem(key))
    write_file_atomic(out / "ca.crt", material.root_bundle_pem.encode(), 0o644)
    click.echo(f"wrote {out / 'tls.crt'}, {out / 'tls.key'} and {out / 'ca.crt'} (caBundle)")
