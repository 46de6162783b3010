"""Checks on rendered deploy/ manifests: Kubernetes schemas, and the references between objects.

`schema_problems` validates one object against the OpenAPI schema of K8S_VERSION
(kubernetes-validate, strict: unknown fields fail) or, for a custom resource, against the part of
its CRD schema the manifests use. `cross_check` follows every reference a typo could break —
selectors, named ports, probes, ConfigMaps, RANKER_* settings, Triton's flags — and returns the
problems as sentences; tests/unit/test_deploy.py breaks manifests on purpose to show each one bites.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

from ranker.config import ENV_PREFIX, Settings
from ranker.tritonserver import TRITON_KEEPALIVE_ARGS

Obj = dict[str, Any]

# The oldest Kubernetes the manifests promise to work on (grpc probes are GA since 1.27).
K8S_VERSION = "1.31"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
TRITON_PROBE_PATHS = {
    "startupProbe": "/v2/health/ready",
    "readinessProbe": "/v2/health/ready",
    "livenessProbe": "/v2/health/live",
}
# Settings allowed in the ConfigMap that are not ranker.config.Settings fields (none today).
PENDING_SETTINGS: set[str] = set()
# Settings that name a Service of the deployment as [scheme://]host:port[/...].
SERVICE_URL_SETTINGS = ("RANKER_TRITON_URL", "RANKER_PROFILE_STORE")
# gRPC core spreads max_connection_age by ±10%, so the last connection can live 1.1× the age.
CONNECTION_AGE_JITTER = 1.1
# Secrets the operator makes (docs/deploy.md), never the manifests, and the keys the pods read from them.
EXTERNAL_SECRETS = {
    "ranker-secrets": {"auth-tokens", "user-ref-key", "redis-password"},
    "ranker-tls": {"tls.crt", "tls.key", "ca.crt"},
}
# Settings that name a file which must exist at start-up: in the manifests, a key of a mounted Secret.
FILE_SETTINGS = {name for name, f in Settings.model_fields.items() if "path_type='file'" in repr(f.annotation)}

_DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
# kubernetes-validate has no schema for custom resources; each is checked against the part of its
# CRD's schema the manifests use (prometheus-operator's ServiceMonitor, monitoring.coreos.com/v1),
# closed to unknown fields like --strict.
CRD_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
            },
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}},
                    },
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "scheme": {"enum": ["http", "https"]},
                            },
                        },
                    },
                },
            },
        },
    }
}


def name_of(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind and name_of(o) == name)


def schema_problems(obj: Obj) -> list[str]:
    where = f"{obj['kind']} {name_of(obj)}"
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        return [f"{where}: {e.message}" for e in jsonschema.Draft202012Validator(crd).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'/'.join(map(str, e.path))}: {e.message}"]
    except SchemaNotFoundError as e:  # the CLI only WARNs; an unknown kind or apiVersion is a failure here
        return [f"{where}: {e.message}"]
    return []


# ---------------------------------------------------------------------------------------------
# Small readers


def selects(selector: Obj, labels: Obj) -> bool:
    """A Service selector (plain map) or a LabelSelector with matchLabels; empty selects nothing here."""
    if "matchExpressions" in selector:
        raise NotImplementedError("matchExpressions: extend the checker before using them")
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def container_port(container: Obj, port: int | str) -> int | None:
    """The container port a probe, Service or NetworkPolicy port (number or name) lands on."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    return None


def flags(args: list[str]) -> dict[str, list[str]]:
    """`--key=value` arguments; a repeated key keeps every value."""
    out: dict[str, list[str]] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out.setdefault(key, []).append(value)
    return out


def prestop_sleep(container: Obj) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"]:
        return float(command[1])
    return float(pre_stop.get("sleep", {}).get("seconds", 0))


@dataclass
class Manifests:
    """The rendered objects, indexed by kind and name."""

    objects: list[Obj]
    kinds: dict[str, dict[str, Obj]] = field(init=False)

    def __post_init__(self) -> None:
        self.kinds = {}
        for obj in self.objects:
            self.kinds.setdefault(obj["kind"], {})[name_of(obj)] = obj

    def of(self, kind: str) -> dict[str, Obj]:
        return self.kinds.get(kind, {})

    @property
    def workloads(self) -> dict[str, Obj]:
        return {f"{k} {name}": o for k in WORKLOAD_KINDS for name, o in self.of(k).items()}

    def pods_selected(self, selector: Obj) -> list[Obj]:
        templates = [w["spec"]["template"] for w in self.workloads.values()]
        return [t for t in templates if selects(selector, t["metadata"].get("labels", {}))]

    def container_env(self, container: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref:
                env.update(self.of("ConfigMap").get(ref["name"], {}).get("data", {}))
        env.update({v["name"]: str(v["value"]) for v in container.get("env", []) if "value" in v})
        return env


def resolves(port: int | str, templates: list[Obj]) -> bool:
    return any(container_port(c, port) for t in templates for c in t["spec"]["containers"])


# ---------------------------------------------------------------------------------------------
# The checks; each returns its problems


def check_services(m: Manifests) -> list[str]:
    problems = []
    for name, svc in m.of("Service").items():
        matched = m.pods_selected(svc["spec"].get("selector", {}))
        if not matched:
            problems.append(f"Service {name}: selector {svc['spec'].get('selector')} matches no pod template")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not resolves(target, matched):
                problems.append(f"Service {name} port {port.get('name')}: targetPort {target} is no container port")
    return problems


def check_pods(m: Manifests) -> list[str]:
    problems = []
    for workload, obj in m.workloads.items():
        spec = obj["spec"]["template"]["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{workload}: pod securityContext.runAsNonRoot is not true")
        claims = obj["spec"].get("volumeClaimTemplates", [])
        volumes = {v["name"] for v in spec.get("volumes", [])} | {c["metadata"]["name"] for c in claims}
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        for container in spec.get("initContainers", []):
            problems += check_container_refs(m, f"{workload} init container {container['name']}", container, volumes)
        for volume in spec.get("volumes", []):
            secret = volume.get("secret", {}).get("secretName")
            if secret is not None and secret not in EXTERNAL_SECRETS and secret not in m.of("Secret"):
                problems.append(f"{workload}: volume {volume['name']}: Secret {secret} is made by no one")
        for container in spec["containers"]:
            where = f"{workload} container {container['name']}"
            problems += check_container_refs(m, where, container, volumes)
            if (container.get("args") or [None])[0] == "tritonserver":
                problems += check_triton(where, container, grace)
            env = m.container_env(container)
            if any(k.startswith(ENV_PREFIX) for k in env):
                secret_files = mounted_secret_files(container, spec.get("volumes", []))
                problems += check_ranker(m, where, container, env, grace, secret_files)
    return problems


def check_container_refs(m: Manifests, where: str, container: Obj, volumes: set[str]) -> list[str]:
    problems = []
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            problems.append(f"{where}: volumeMount {mount['name']} is no volume of the pod")
    config_maps = m.of("ConfigMap")
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and ref["name"] not in config_maps:
            problems.append(f"{where}: envFrom ConfigMap {ref['name']} does not exist")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        if ref and ref["key"] not in config_maps.get(ref["name"], {}).get("data", {}):
            problems.append(f"{where}: env {var['name']} refers to missing {ref['name']}/{ref['key']}")
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["key"] not in EXTERNAL_SECRETS.get(ref["name"], set()):
            problems.append(f"{where}: env {var['name']} refers to Secret key {ref['name']}/{ref['key']} no one makes")
    for probe_kind in PROBES:
        probe = container.get(probe_kind, {})
        action = next((probe[a] for a in ("httpGet", "tcpSocket", "grpc") if a in probe), None)
        if action is not None and container_port(container, action["port"]) is None:
            problems.append(f"{where}: {probe_kind} port {action['port']} is no container port")
    return problems


def check_triton(where: str, container: Obj, grace: float) -> list[str]:
    problems = []
    args = flags(container["args"][1:])
    if args.get("--model-control-mode") != ["explicit"]:
        problems.append(f"{where}: --model-control-mode must be explicit (the ranker loads each release's models)")
    if "--load-model" in args:
        problems.append(
            f"{where}: --load-model {args['--load-model']}: the ranker loads the models, under per-release names"
        )
    for flag in TRITON_KEEPALIVE_ARGS:
        name, _, value = flag.partition("=")
        if args.get(name) != [value]:
            problems.append(f"{where}: {flag} is missing: the rankers' keepalive pings would close the connection")
    for port_name in ("http", "grpc", "metrics"):
        flag = args.get(f"--{port_name}-port", [""])[0]
        if str(container_port(container, port_name)) != flag:
            problems.append(f"{where}: container port {port_name} != --{port_name}-port={flag}")
    http_port = container_port(container, "http")
    for probe_kind, path in TRITON_PROBE_PATHS.items():
        get = container.get(probe_kind, {}).get("httpGet", {})
        if get.get("path") != path or container_port(container, get.get("port", "")) != http_port:
            problems.append(f"{where}: {probe_kind} must GET {path} on the http port")
    drain = prestop_sleep(container) + float(args.get("--exit-timeout-secs", ["30"])[0])
    if grace <= drain:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= preStop + exit timeout {drain}")
    return problems


def mounted_secret_files(container: Obj, volumes: list[Obj]) -> set[str]:
    """The paths at which `container` sees the keys of the operator-made Secrets it mounts."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}
    return {
        f"{mount['mountPath'].rstrip('/')}/{key}"
        for mount in container.get("volumeMounts", [])
        if mount["name"] in secrets
        for key in EXTERNAL_SECRETS.get(secrets[mount["name"]], set())
    }


def check_ranker(
    m: Manifests, where: str, container: Obj, env: dict[str, str], grace: float, secret_files: set[str]
) -> list[str]:
    fields = {ENV_PREFIX + f.upper(): f for f in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in fields.keys() | PENDING_SETTINGS)
    if unknown:
        return [f"{where}: not settings of ranker.config.Settings: {unknown}"]
    values = {fields[k]: v for k, v in env.items() if k in fields}
    problems = [
        f"{where}: {ENV_PREFIX}{name.upper()}={values[name]} is no key of a mounted Secret"
        for name in sorted(FILE_SETTINGS & values.keys())
        if values[name] not in secret_files
    ]
    # The files exist only in the pod: validate the rest with a file that exists here.
    try:
        settings = Settings.model_validate({**values, **dict.fromkeys(FILE_SETTINGS & values.keys(), __file__)})
    except ValueError as e:
        return [*problems, f"{where}: settings do not validate: {e}"]
    if settings.auth_token_file is None and settings.auth_tokens is None:
        problems.append(f"{where}: no RANKER_AUTH_TOKEN_FILE: mutating and admin RPCs would be open to anyone")
    if settings.profile_store.startswith("redis") and settings.profile_store_password_file is None:
        problems.append(f"{where}: no RANKER_PROFILE_STORE_PASSWORD_FILE: Redis requires its password")
    metrics_port = int(env.get("RANKER_METRICS_PORT", "9464"))
    if container_port(container, "grpc") != settings.port:
        problems.append(f"{where}: container port grpc != RANKER_PORT {settings.port}")
    if container_port(container, "metrics") != metrics_port:
        problems.append(f"{where}: container port metrics != RANKER_METRICS_PORT {metrics_port}")
    # The kubelet's grpc probes speak plaintext: with TLS on RANKER_PORT they must ask RANKER_HEALTH_PORT.
    probe_port, probe_setting = settings.port, "RANKER_PORT"
    if settings.health_port is not None:
        probe_port, probe_setting = settings.health_port, "RANKER_HEALTH_PORT"
        if container_port(container, "health") != settings.health_port:
            problems.append(f"{where}: container port health != RANKER_HEALTH_PORT {settings.health_port}")
    elif settings.tls_cert_file is not None:
        problems.append(f"{where}: TLS on RANKER_PORT and no RANKER_HEALTH_PORT: the grpc probes cannot connect")
    for probe_kind in PROBES:
        if container.get(probe_kind, {}).get("grpc", {}).get("port") != probe_port:
            problems.append(f"{where}: {probe_kind} must be a grpc probe on {probe_setting} {probe_port}")
    if grace <= prestop_sleep(container) + settings.drain_s + settings.grace_s:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= preStop + RANKER_DRAIN_S + RANKER_GRACE_S")
    if settings.drain_s + prestop_sleep(container) == 0:
        problems.append(f"{where}: no RANKER_DRAIN_S: calls that arrive as the pod stops would come back CANCELLED")
    age = settings.max_connection_age_s
    if age is not None and settings.drain_s < age * CONNECTION_AGE_JITTER:
        problems.append(
            f"{where}: RANKER_DRAIN_S {settings.drain_s} < RANKER_MAX_CONNECTION_AGE_S {age} plus its jitter: "
            "connections younger than the drain would still be open at the stop"
        )
    mounts = [mount["mountPath"].rstrip("/") + "/" for mount in container.get("volumeMounts", [])]
    if settings.triton_models != "push":
        problems.append(
            f"{where}: RANKER_TRITON_MODELS must be push (Triton starts empty), got {settings.triton_models}"
        )
    if settings.release is None or not any(str(settings.release).startswith(p) for p in mounts):
        problems.append(f"{where}: RANKER_RELEASE {settings.release} is not on a mounted volume")
    for key in SERVICE_URL_SETTINGS:
        url = re.match(r"^(?:\w+://)?([a-z0-9-]+):(\d+)(?:/.*)?$", env.get(key, ""))
        svc = m.of("Service").get(url.group(1)) if url else None
        if url is None or svc is None or int(url.group(2)) not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"{where}: {key}={env.get(key)} is no Service port of this deployment")
    return problems


def check_autoscalers(m: Manifests) -> list[str]:
    problems = []
    for name, hpa in m.of("HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = m.of(ref["kind"]).get(ref["name"])
        if target is None:
            problems.append(f"HorizontalPodAutoscaler {name}: target {ref['kind']} {ref['name']} does not exist")
        elif "replicas" in target["spec"]:
            problems.append(f"HorizontalPodAutoscaler {name}: {ref['kind']} {ref['name']} sets replicas the HPA owns")
    return problems


def check_disruption_budgets(m: Manifests) -> list[str]:
    return [
        f"PodDisruptionBudget {name}: selector matches no pod template"
        for name, pdb in m.of("PodDisruptionBudget").items()
        if not m.pods_selected(pdb["spec"]["selector"])
    ]


def check_network_policies(m: Manifests) -> list[str]:
    problems = []
    for name, policy in m.of("NetworkPolicy").items():
        targets = m.pods_selected(policy["spec"]["podSelector"])
        if not targets:
            problems.append(f"NetworkPolicy {name}: podSelector matches no pod template")
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                # A podSelector with a namespaceSelector selects pods elsewhere: nothing to check here.
                if (
                    "podSelector" in peer
                    and "namespaceSelector" not in peer
                    and not m.pods_selected(peer["podSelector"])
                ):
                    problems.append(f"NetworkPolicy {name}: from podSelector {peer['podSelector']} matches no pod")
            for port in rule.get("ports", []):
                if targets and not resolves(port["port"], targets):
                    problems.append(f"NetworkPolicy {name}: port {port['port']} is no port of the selected pods")
    return problems


def check_service_monitors(m: Manifests) -> list[str]:
    problems = []
    for name, monitor in m.of("ServiceMonitor").items():
        selector = monitor["spec"]["selector"]
        matched = [s for s in m.of("Service").values() if selects(selector, s["metadata"].get("labels", {}))]
        if not matched:
            problems.append(f"ServiceMonitor {name}: selector matches no Service")
            continue
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in matched):
                problems.append(f"ServiceMonitor {name}: port {endpoint['port']} is no named port of its Services")
    return problems


def check_stateful_sets(m: Manifests) -> list[str]:
    return [
        f"StatefulSet {name}: serviceName {sts['spec']['serviceName']} is no Service"
        for name, sts in m.of("StatefulSet").items()
        if sts["spec"]["serviceName"] not in m.of("Service")
    ]


CHECKS: tuple[Callable[[Manifests], list[str]], ...] = (
    check_services,
    check_pods,
    check_autoscalers,
    check_disruption_budgets,
    check_network_policies,
    check_service_monitors,
    check_stateful_sets,
)


def cross_check(objects: list[Obj]) -> list[str]:
    """Every reference between the objects, as a list of problems (empty when all hold)."""
    manifests = Manifests(objects)
    return [problem for check in CHECKS for problem in check(manifests)]
