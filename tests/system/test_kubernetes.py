"""deploy/kubernetes/ is documentation that must stay true, as docker-compose.yml is.

No cluster: every manifest validates offline against the Kubernetes schemas (kubernetes-validate,
strict: an unknown or misplaced field fails), for the oldest Kubernetes the peers need (1.28, the
first with the pod-index label) and one where that label is GA. Each container's args then go
through the CLI's own parser for every pod the StatefulSets make, with the $(VAR) references
Kubernetes would substitute filled from plausible pod fields, and the pieces must fit: node ids
0..N-1 from the ordinals, N = the bootstrap's --expect, --advertise the pod's name under the
headless Service, ports equal across args, Services and probes. The TLS settings point into the
mounted Secret; certificates made by the docs' own `crossgrad certs` command, loaded from each
pod's environment as the process would, name the node that pod is.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from crossgrad.certs import make_run_certificates
from crossgrad.security import Role, SecurityFlags, load_security, node_uri

from deployfiles import check_run_settings, identities, parse_command, split_address
from procs import REPO

MANIFESTS = REPO / "deploy" / "kubernetes"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
KUBERNETES_VERSIONS = ("1.28.0", "1.32.0")
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
NAMESPACE = "crossgrad"  # any: nothing in the manifests names one
# The GPU option: uncomment the lines ending in "# gpu" (the sed in peers.yaml and the docs).
GPU_SED = r"sed -E 's/^( *)# (.*# gpu)$/\1\2/'"
GPU_LINE = re.compile(r"^( *)# (.*# gpu)$", re.MULTILINE)
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def files() -> list[Path]:
    found = sorted(MANIFESTS.glob("*.yaml"))
    assert [f.name for f in found] == ["bootstrap.yaml", "peers.yaml"], found
    return found


def resources(text: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> the resource, from every file (or from `text` alone)."""
    docs = documents(text) if text is not None else [
        doc for f in files() for doc in documents(f.read_text())]
    found = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(found) == len(docs), "two resources of one kind share a name"
    return found


def with_gpu(text: str) -> str:
    return GPU_LINE.sub(r"\1\2", text)


def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{statefulset['metadata']['name']}: one container per pod"
    return containers[0]


def substitute(text: str, env: dict[str, str], where: str) -> str:
    """$(VAR) as Kubernetes expands it; a reference to nothing stays literal there, silently,
    so here it fails."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{where}: $({name}) refers to no variable defined before it"
        return env[name]
    return REFERENCE.sub(value, text)


def pod_env(statefulset: dict[str, Any], ordinal: int) -> dict[str, str]:
    """The container's environment in pod `ordinal`, as the kubelet resolves it: in order,
    downward-API fields from the pod, $(VAR) only of the variables defined above."""
    pod = f"{statefulset['metadata']['name']}-{ordinal}"
    fields = {"metadata.name": pod, "metadata.namespace": NAMESPACE,
              f"metadata.labels['{POD_INDEX_LABEL}']": str(ordinal)}
    env: dict[str, str] = {}
    for var in container(statefulset).get("env", []):
        if "value" in var:
            env[var["name"]] = substitute(var["value"], env, f"{pod} env {var['name']}")
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in fields, f"{pod} env {var['name']}: no plausible value for {path}"
            env[var["name"]] = fields[path]
    return env


def pod_args(statefulset: dict[str, Any], ordinal: int) -> Any:
    """The parsed args of pod `ordinal`."""
    pod = f"{statefulset['metadata']['name']}-{ordinal}"
    env = pod_env(statefulset, ordinal)
    args = [substitute(arg, env, f"{pod} args") if isinstance(arg, str) else arg
            for arg in container(statefulset)["args"]]
    return parse_command(pod, args)


def mounts(statefulset: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount path in the container."""
    return {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}


def secret_mount(statefulset: dict[str, Any]) -> tuple[str, str]:
    """(the Secret's name, where the container sees it)."""
    volumes = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert len(volumes) == 1, f"{statefulset['metadata']['name']}: one Secret volume"
    return volumes[0]["secret"]["secretName"], mounts(statefulset)[volumes[0]["name"]]


def container_port(statefulset: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(statefulset)["ports"]}
    assert name in ports, f"{statefulset['metadata']['name']}: no container port named {name}"
    return int(ports[name])


def docs_certs_command() -> Any:
    """The `crossgrad certs` command of the docs' Kubernetes section, parsed."""
    text = DEPLOYMENT_DOC.read_text()
    section = text[text.index("## Kubernetes"):]
    match = re.search(r"^crossgrad certs .*?[^\\]$", section.replace("\\\n", " "), re.MULTILINE)
    assert match, "docs/deployment.md, Kubernetes: no `crossgrad certs` command"
    return parse_command("docs", shlex.split(match.group(0))[1:])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", ["as-is", "gpu"])
def test_every_manifest_validates_offline(version: str, variant: str) -> None:
    for path in files():
        text = path.read_text() if variant == "as-is" else with_gpu(path.read_text())
        for doc in documents(text):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not a "
                            f"valid Kubernetes {version} resource at {where}: {exc.message}")


def test_the_gpu_lines_add_one_gpu_per_peer_and_nothing_else() -> None:
    text = (MANIFESTS / "peers.yaml").read_text()
    assert GPU_SED in text, "peers.yaml shows the sed that uncomments the GPU lines"
    assert GPU_SED in DEPLOYMENT_DOC.read_text(), "docs/deployment.md shows the same sed"
    plain, gpu = resources(text), resources(with_gpu(text))
    peer = container(gpu[("StatefulSet", "peer")])
    assert peer["resources"].pop("limits") == {"nvidia.com/gpu": "1"}
    assert gpu == plain, "uncommenting the GPU lines changed more than the limit"
    assert pod_args(plain[("StatefulSet", "peer")], 0).device == "auto", (
        "--device auto: the peers use the GPU when they are given one")


def test_every_pods_args_parse_and_the_addresses_fit_the_services() -> None:
    found = resources()
    boot_set, peer_set = found[("StatefulSet", "bootstrap")], found[("StatefulSet", "peer")]
    assert boot_set["spec"]["replicas"] == 1, "one bootstrap per run"
    boot = pod_args(boot_set, 0)
    assert boot.command == "bootstrap"
    _, boot_port = split_address(boot.bind)
    assert container_port(boot_set, "grpc") == boot_port, "bootstrap: containerPort != --bind"
    boot_service = found[("Service", "bootstrap")]
    assert boot_service["spec"]["selector"] == boot_set["spec"]["template"]["metadata"]["labels"]
    assert boot_service["spec"]["ports"] == [
        {"name": "grpc", "port": boot_port, "targetPort": "grpc"}]

    replicas = peer_set["spec"]["replicas"]
    assert boot.nodes == replicas, (
        f"the bootstrap expects {boot.nodes} peers; the StatefulSet makes {replicas}")
    headless_name = peer_set["spec"]["serviceName"]
    headless = found[("Service", headless_name)]
    assert headless["spec"]["clusterIP"] == "None", "the peers' Service must be headless"
    assert headless["spec"]["selector"] == peer_set["spec"]["template"]["metadata"]["labels"]
    runs = mounts(peer_set)[peer_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]]

    peers = [pod_args(peer_set, ordinal) for ordinal in range(replicas)]
    for ordinal, args in enumerate(peers):
        pod = f"peer-{ordinal}"
        assert args.command == "peer" and args.node_id == ordinal, f"{pod}: --id {args.node_id}"
        assert split_address(args.bootstrap) == ("bootstrap", boot_port), (
            f"{pod}: --bootstrap {args.bootstrap} is not the bootstrap Service's address")
        _, port = split_address(args.bind)
        assert args.advertise == f"{pod}.{headless_name}:{port}", (
            f"{pod}: --advertise {args.advertise} is not its name under the headless Service")
        assert container_port(peer_set, "grpc") == port, f"{pod}: containerPort != --bind"
        assert headless["spec"]["ports"] == [{"name": "grpc", "port": port, "targetPort": "grpc"}]
        assert str(args.out).startswith(runs), f"{pod}: --out {args.out} is not on its volume"


def test_the_peers_start_together_and_resolve_before_they_are_ready() -> None:
    """A peer is Ready (SERVING) only once every peer has joined: started one by one, or
    unresolvable until Ready, the run would never assemble."""
    found = resources()
    assert found[("StatefulSet", "peer")]["spec"]["podManagementPolicy"] == "Parallel"
    assert found[("Service", "peers")]["spec"]["publishNotReadyAddresses"] is True


def test_the_bootstrap_settings_are_a_valid_run_kept_on_its_volume() -> None:
    boot_set = resources()[("StatefulSet", "bootstrap")]
    args = pod_args(boot_set, 0)
    check_run_settings("bootstrap", args)
    claims = [t["metadata"]["name"] for t in boot_set["spec"]["volumeClaimTemplates"]]
    assert args.state and args.state.startswith(mounts(boot_set)[claims[0]] + "/"), (
        f"--state {args.state} is not on the bootstrap's PersistentVolumeClaim")


def test_every_probe_asks_the_health_service_on_the_bound_port() -> None:
    for (kind, name), resource in resources().items():
        if kind != "StatefulSet":
            continue
        port = split_address(pod_args(resource, 0).bind)[1]
        spec = container(resource)
        for probe in PROBES:
            assert spec[probe]["exec"]["command"] == [
                "python", "-m", "crossgrad.healthcheck", f"127.0.0.1:{port}"], (
                f"{name}: {probe} {spec[probe]}")
            # The default 1 s would not even cover starting Python with grpc.
            assert spec[probe]["timeoutSeconds"] >= 5, f"{name}: {probe}"


def test_each_pod_presents_the_certificate_that_names_it(tmp_path: Path) -> None:
    """The docs' `crossgrad certs` makes what the manifests mount, and each pod's environment
    loads its own certificate (mutual TLS), for the process and for its health probe."""
    found = resources()
    boot_set, peer_set = found[("StatefulSet", "bootstrap")], found[("StatefulSet", "peer")]
    replicas = peer_set["spec"]["replicas"]
    certs = docs_certs_command()
    hosts = certs.hosts.split(",")
    assert certs.nodes == replicas, f"the docs make {certs.nodes} node certificates"
    assert {"127.0.0.1", "bootstrap", *(f"peer-{i}.peers" for i in range(replicas))} <= set(
        hosts), f"the docs' --hosts {certs.hosts} miss a probe's or a pod's name"
    made = make_run_certificates(tmp_path, certs.nodes, hosts=hosts)

    secrets = {secret_mount(s) for s in (boot_set, peer_set)}
    assert len(secrets) == 1, f"both mount one Secret at one place: {secrets}"
    (_, mount), = secrets
    pods = [(boot_set, 0, "crossgrad://bootstrap")] + [
        (peer_set, i, node_uri(i)) for i in range(replicas)]
    for statefulset, ordinal, want in pods:
        pod = f"{statefulset['metadata']['name']}-{ordinal}"
        env = pod_env(statefulset, ordinal)
        tls = {k: v for k, v in env.items() if k.startswith("CROSSGRAD_")}
        assert set(tls) == {"CROSSGRAD_TLS_CA", "CROSSGRAD_TLS_CERT", "CROSSGRAD_TLS_KEY"}, pod
        for var, path in tls.items():
            assert path.startswith(mount + "/"), f"{pod}: {var}={path} is not in the Secret"
        local = {k: v.replace(mount, str(made.out), 1) for k, v in tls.items()}
        for role in Role:
            security = load_security(SecurityFlags(), role, command=pod, environ=local)
            assert security.mutual, f"{pod} ({role.value})"
            assert identities(security.cert or b"") == [want], f"{pod} would present another"
