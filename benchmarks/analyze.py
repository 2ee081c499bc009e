"""How long ``meshtrust analyze`` and ``describe`` take on a large mesh file (in process).

A generated mesh of ``--services`` services in one namespace, each calling the next (a
ring), under a STRICT mesh-wide PeerAuthentication, with two AuthorizationPolicies per
service: an ALLOW naming its one caller and a DENY on another namespace. So every analyzer
has work (every policy selects one service; every upstream is judged) and the mesh is
clean: no finding. Prints the median of ``--runs`` runs of loading + analyzing the files
(:func:`meshtrust.mesh.analyze.analyze_file`) and of describing one service.

    .venv/bin/python benchmarks/analyze.py --services 500 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from meshtrust.mesh.analyze import analyze_file
from meshtrust.mesh.config import load_mesh_config
from meshtrust.mesh.describe import describe_workload
from meshtrust.policy import load_policy_files

STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def write_mesh(directory: Path, count: int) -> Path:
    services = [
        {
            "name": f"s{i}",
            "port": 20000 + i,
            "upstreams": [{"service": f"s{(i + 1) % count}", "localPort": 30000 + i}],
        }
        for i in range(count)
    ]
    mesh = {"workDir": "./work", "services": services, "policies": ["policies.yaml"]}
    (directory / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    documents = [STRICT]
    for i in range(count):
        caller = f"cluster.local/ns/default/sa/s{(i - 1) % count}"
        selector = f"  selector: {{matchLabels: {{app: s{i}}}}}\n"
        documents.append(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: allow-{i}, namespace: default}}\nspec:\n{selector}"
            f"  rules: [{{from: [{{source: {{principals: [{caller}]}}}}]}}]\n"
        )
        documents.append(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: deny-{i}, namespace: default}}\nspec:\n{selector}"
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]\n"
        )
    (directory / "policies.yaml").write_text("---\n".join(documents))
    return directory / "mesh.yaml"


def median_seconds(runs: int, work: object) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=500, help="services in the mesh")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = write_mesh(Path(scratch), args.services)
        report = analyze_file(path)
        assert not report.findings, [str(f) for f in report.findings]
        analyze = median_seconds(args.runs, lambda: analyze_file(path))
        config = load_mesh_config(path)
        policies = load_policy_files(list(config.policy_files))
        describe = median_seconds(args.runs, lambda: describe_workload(config, policies, "s0"))
    count = args.services
    print(f"{count} services, {2 * count + 1} policies, median of {args.runs} runs:")
    print(f"  analyze (load + every analyzer): {analyze:.2f} s")
    print(f"  describe one service (files already loaded): {describe * 1000:.1f} ms")


if __name__ == "__main__":
    main()
