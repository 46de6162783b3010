"""deploy/: the images and the kustomize overlays, checked without Docker or a cluster.

Each overlay is rendered (the real kustomize when installed, else deploy_render's subset, which a
test compares with the real one), validated against the Kubernetes schemas (deploy_checks) and
cross-checked; mutated copies show that each cross-check reports what it should. The Dockerfiles
are read statically: pinned bases, a numeric non-root USER, health checks, files that exist.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import importlib.metadata
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.deploy_checks import CRD_SCHEMAS, Obj, cross_check, find, flags, name_of, schema_problems
from tests.unit.deploy_render import kustomize_command, render, render_subset, render_with_kustomize, split_image

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
OVERLAYS = ("cpu", "gpu", "gpu-tls")
KUSTOMIZATIONS = ("base", "monitoring", "overlays/cpu", "overlays/gpu", "overlays/gpu-tls")


@functools.cache
def _rendered(path: str) -> list[Obj]:
    return render(DEPLOY / path)


def rendered(path: str) -> list[Obj]:
    """A fresh copy of a kustomization's objects (rendered once per session), free to mutate."""
    return copy.deepcopy(_rendered(path))


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, rendered(f"overlays/{request.param}")


def pod_spec(objects: list[Obj], kind: str, name: str) -> Obj:
    spec: Obj = find(objects, kind, name)["spec"]["template"]["spec"]
    return spec


def pod_containers(obj: Obj) -> Iterator[Obj]:
    if obj["kind"] in ("Deployment", "StatefulSet"):
        spec = obj["spec"]["template"]["spec"]
        yield from spec.get("initContainers", []) + spec["containers"]


def gpu_requests(objects: list[Obj]) -> dict[str, object]:
    return {
        f"{o['kind']} {name_of(o)}/{c['name']}": c["resources"]["limits"]["nvidia.com/gpu"]
        for o in objects
        for c in pod_containers(o)
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    }


# ---------------------------------------------------------------------------------------------
# Rendering, schemas, cross-references


def test_subset_renderer_matches_kustomize() -> None:
    if kustomize_command() is None:
        pytest.skip("no kustomize or kubectl on PATH (neither is on PyPI); the other tests used the subset renderer")
    for path in KUSTOMIZATIONS:
        ours = {(o["kind"], name_of(o)): o for o in render_subset(DEPLOY / path)}
        real = {(o["kind"], name_of(o)): o for o in render_with_kustomize(DEPLOY / path)}
        assert ours == real, path


def test_subset_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        render_subset(tmp_path)


def test_every_object_matches_its_schema(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    assert [p for o in objects for p in schema_problems(o)] == []


def test_schema_validation_rejects_unknown_fields_and_kinds() -> None:
    objects = rendered("overlays/gpu")
    deployment = find(objects, "Deployment", "ranker")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    monitor = find(objects, "ServiceMonitor", "triton")
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    for obj in (deployment, monitor, widget):
        assert schema_problems(obj), obj["kind"]


def test_cross_references_hold(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    assert cross_check(objects) == []


def test_every_image_has_a_tag(overlay: tuple[str, list[Obj]]) -> None:
    """The base's placeholder names (ranker, ranker-triton, ranker-release) are all mapped."""
    _, objects = overlay
    for o in objects:
        for c in pod_containers(o):
            _, suffix = split_image(c["image"])
            assert suffix not in ("", ":latest"), f"{o['kind']} {name_of(o)}: image {c['image']}"


def test_only_the_gpu_overlay_asks_for_gpus(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    triton = pod_spec(objects, "Deployment", "triton")
    # The ranker sends each model's configuration with the model (ranker/swap.py): its setting picks the variant.
    config_name = find(objects, "ConfigMap", "ranker-settings")["data"]["RANKER_TRITON_CONFIG_NAME"]
    assert "--model-config-name" not in flags(triton["containers"][0]["args"][1:]), "Triton's flag is not used"
    if name.startswith("gpu"):
        assert gpu_requests(objects) == {"Deployment triton/triton": 1}
        assert config_name == "default", "on GPUs Triton must get each model's config.pbtxt"
        assert triton["nodeSelector"] and triton["tolerations"]
    else:
        assert gpu_requests(objects) == {}
        assert config_name == "cpu", "without a GPU Triton must get configs/cpu.pbtxt"
        assert "nodeSelector" not in triton
    assert gpu_requests(rendered("base")) == {}


def test_the_tls_overlay_mounts_its_certificates_and_probes_the_plaintext_health_port() -> None:
    objects = rendered("overlays/gpu-tls")
    settings = find(objects, "ConfigMap", "ranker-settings")["data"]
    assert {k: v for k, v in settings.items() if k.startswith("RANKER_TLS_")} == {
        "RANKER_TLS_CERT_FILE": "/etc/ranker/tls/tls.crt",
        "RANKER_TLS_KEY_FILE": "/etc/ranker/tls/tls.key",
        "RANKER_TLS_CLIENT_CA_FILE": "/etc/ranker/tls/ca.crt",  # mTLS
    }
    assert "RANKER_TLS_CERT_FILE" not in find(rendered("overlays/gpu"), "ConfigMap", "ranker-settings")["data"]
    container = pod_spec(objects, "Deployment", "ranker")["containers"][0]
    assert {c["grpc"]["port"] for c in (container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))} == {
        int(settings["RANKER_HEALTH_PORT"])
    }
    # Without the health port the probes could not connect: the cross-check says so.
    del settings["RANKER_HEALTH_PORT"]
    assert any("no RANKER_HEALTH_PORT: the grpc probes cannot connect" in p for p in cross_check(objects))


def test_cpu_overlay_needs_no_custom_resource_definitions() -> None:
    """A fresh kind cluster has no Prometheus Operator, and `kubectl apply` would reject a ServiceMonitor."""
    objects = rendered("overlays/cpu")
    assert [o["kind"] for o in objects if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS] == []


# ---------------------------------------------------------------------------------------------
# The cross-checks bite: each mutation is a mistake someone could make, and must be reported.

CONTAINER: list[str | int] = ["spec", "template", "spec", "containers", 0]
SETTINGS = ("ConfigMap", "ranker-settings")
DELETE = object()  # as a new value: remove the entry
# name: (kind, object name, path in the object, new value, expected problem text)
MUTATIONS: dict[str, tuple[str, str, list[str | int], object, str]] = {
    "service selector typo": (
        "Service", "triton", ["spec", "selector"], {"app.kubernetes.io/name": "tritn"}, "Service triton: selector",
    ),
    "container port renamed": (
        "Deployment", "triton", [*CONTAINER, "ports", 1, "name"], "grpc-api", "Service triton port grpc: targetPort",
    ),
    "triton port and flag disagree": (
        "Deployment", "triton", [*CONTAINER, "ports", 0, "containerPort"], 8080, "port http != --http-port=8000",
    ),
    "liveness on a wrong path": (
        "Deployment", "triton", [*CONTAINER, "livenessProbe", "httpGet", "path"], "/v2/health",
        "livenessProbe must GET /v2/health/live",
    ),
    "models loaded at triton's start": (
        "Deployment", "triton", [*CONTAINER, "args", 3], "--load-model=ranker", "--load-model",
    ),
    "triton refuses the rankers' keepalive pings": (
        "Deployment", "triton", [*CONTAINER, "args", -1], "--log-verbose=0", "--grpc-http2-min-recv-ping-interval",
    ),
    "triton takes no model loads": (
        "Deployment", "triton", [*CONTAINER, "args", 2], "--model-control-mode=none", "must be explicit",
    ),
    "ranker expects preloaded models": (
        *SETTINGS, ["data", "RANKER_TRITON_MODELS"], "preloaded", "RANKER_TRITON_MODELS must be push",
    ),
    "ranker probe on another port": (
        "Deployment", "ranker", [*CONTAINER, "readinessProbe", "grpc", "port"], 50053,
        "readinessProbe port 50053 is no container port",
    ),
    "ranker probe on the grpc port": (
        "Deployment", "ranker", [*CONTAINER, "livenessProbe", "grpc", "port"], 50051,
        "livenessProbe must be a grpc probe on RANKER_HEALTH_PORT 50052",
    ),
    "health port setting and container port differ": (
        *SETTINGS, ["data", "RANKER_HEALTH_PORT"], "50053", "container port health != RANKER_HEALTH_PORT 50053",
    ),
    "missing configmap": (
        "Deployment", "ranker", [*CONTAINER, "envFrom", 0, "configMapRef", "name"], "settings",
        "envFrom ConfigMap settings does not exist",
    ),
    "grace period shorter than the drain": (
        "Deployment", "ranker", ["spec", "template", "spec", "terminationGracePeriodSeconds"], 12,
        "terminationGracePeriodSeconds 12.0 <= preStop + RANKER_DRAIN_S + RANKER_GRACE_S",
    ),
    "no drain before the stop": (*SETTINGS, ["data", "RANKER_DRAIN_S"], "0", "no RANKER_DRAIN_S"),
    "drain shorter than the connection age": (
        *SETTINGS, ["data", "RANKER_MAX_CONNECTION_AGE_S"], "11", "RANKER_DRAIN_S 12.0 < RANKER_MAX_CONNECTION_AGE_S",
    ),
    "replicas next to an hpa": (
        "Deployment", "ranker", ["spec", "replicas"], 3, "sets replicas the HPA owns",
    ),
    "hpa target renamed": (
        "HorizontalPodAutoscaler", "ranker", ["spec", "scaleTargetRef", "name"], "rankr",
        "target Deployment rankr does not exist",
    ),
    "pdb selector typo": (
        "PodDisruptionBudget", "triton", ["spec", "selector", "matchLabels"], {"app": "triton"},
        "PodDisruptionBudget triton: selector",
    ),
    "network policy peer typo": (
        "NetworkPolicy", "redis", ["spec", "ingress", 0, "from", 0, "podSelector", "matchLabels"],
        {"app.kubernetes.io/name": "rank"}, "NetworkPolicy redis: from podSelector",
    ),
    "network policy port": (
        "NetworkPolicy", "redis", ["spec", "ingress", 0, "ports", 0, "port"], "http", "NetworkPolicy redis: port http",
    ),
    "unknown setting": (*SETTINGS, ["data", "RANKER_TOP_K"], "10", "RANKER_TOP_K"),
    "no token file": (*SETTINGS, ["data", "RANKER_AUTH_TOKEN_FILE"], DELETE, "no RANKER_AUTH_TOKEN_FILE"),
    "token file outside the secret": (
        *SETTINGS, ["data", "RANKER_AUTH_TOKEN_FILE"], "/etc/ranker/tokens",
        "RANKER_AUTH_TOKEN_FILE=/etc/ranker/tokens is no key of a mounted Secret",
    ),
    "no redis password": (
        *SETTINGS, ["data", "RANKER_PROFILE_STORE_PASSWORD_FILE"], DELETE, "no RANKER_PROFILE_STORE_PASSWORD_FILE",
    ),
    "secret volume of an unknown secret": (
        "Deployment", "ranker", ["spec", "template", "spec", "volumes", 1, "secret", "secretName"], "ranker-secret",
        "Secret ranker-secret is made by no one",
    ),
    "redis password from an unknown key": (
        "StatefulSet", "redis", [*CONTAINER, "env", 0, "valueFrom", "secretKeyRef", "key"], "password",
        "Secret key ranker-secrets/password no one makes",
    ),
    "invalid setting value": (*SETTINGS, ["data", "RANKER_GRACE_S"], "soon", "grace_s"),
    "triton url on the wrong port": (
        *SETTINGS, ["data", "RANKER_TRITON_URL"], "triton:9001", "RANKER_TRITON_URL=triton:9001",
    ),
    "profile store on no service": (
        *SETTINGS, ["data", "RANKER_PROFILE_STORE"], "redis://cache:6379/0", "RANKER_PROFILE_STORE=",
    ),
    "service monitor port": (
        "ServiceMonitor", "ranker", ["spec", "endpoints", 0, "port"], "prometheus",
        "ServiceMonitor ranker: port prometheus",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_cross_check_reports_a_broken_manifest(mutation: str) -> None:
    kind, name, path, value, expected = MUTATIONS[mutation]
    objects = rendered("overlays/gpu")
    node: Any = find(objects, kind, name)
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    problems = cross_check(objects)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# Dockerfiles, statically (no Docker where the tests run)

IMAGES = ("ranker", "triton", "release")
# An exact version (3.11.14-slim-bookworm, 1.37.0), an NGC release (24.10-py3), or a digest.
PINNED = re.compile(r"@sha256:[0-9a-f]{64}$|:(\d+\.\d+\.\d+|\d{2}\.\d{2}-py3)([-.][\w.-]+)?$")


def dockerfile(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / f"{image}.Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (w.upper(), rest.strip())
        for w, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def base_images(steps: list[tuple[str, str]]) -> list[str]:
    """FROM images with ARG defaults substituted, leaving out earlier stages."""
    args = {rest.partition("=")[0]: rest.partition("=")[2] for word, rest in steps if word == "ARG"}
    stages: set[str] = set()
    images = []
    for word, rest in steps:
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            if image not in stages:
                images.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return images


def dockerignored(path: str) -> bool:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(s, pattern[3:]) for s in suffixes):
                return True
        elif any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            return True
    return False


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image: str) -> None:
    images = base_images(dockerfile(image))
    assert images and all(PINNED.search(i) for i in images), images


@pytest.mark.parametrize("image", IMAGES)
def test_images_run_as_a_numeric_non_root_user(image: str) -> None:
    users = [rest for word, rest in dockerfile(image) if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so that Kubernetes' runAsNonRoot can verify it"


def test_service_images_match_their_pods() -> None:
    objects = rendered("overlays/gpu")
    for image in ("ranker", "triton"):
        steps = dockerfile(image)
        pod = pod_spec(objects, "Deployment", image)
        uid = [rest for word, rest in steps if word == "USER"][-1].split(":")[0]
        assert int(uid) == pod["securityContext"]["runAsUser"], image
        exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
        assert exposed == {p["containerPort"] for p in pod["containers"][0]["ports"]}, image


def test_ranker_image_checks_health_and_serves() -> None:
    steps = dict(dockerfile("ranker"))
    health = json.loads(steps["HEALTHCHECK"].split("CMD", 1)[1])
    assert health[:4] == ["python", "-m", "ranker", "health"]
    settings = find(rendered("base"), *SETTINGS)["data"]
    assert health[health.index("--target") + 1] == f"localhost:{settings['RANKER_HEALTH_PORT']}"
    env = " ".join(rest for word, rest in dockerfile("ranker") if word == "ENV")
    assert f"RANKER_HEALTH_PORT={settings['RANKER_HEALTH_PORT']}" in env  # the check works with TLS on the port too
    assert json.loads(steps["ENTRYPOINT"]) == ["python", "-m", "ranker", "serve"]
    for command in ("health", "serve"):
        cli = subprocess.run([sys.executable, "-m", "ranker", command, "--help"], capture_output=True, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr


def test_triton_image_checks_readiness() -> None:
    assert "http://localhost:8000/v2/health/ready" in dict(dockerfile("triton"))["HEALTHCHECK"]


@pytest.mark.parametrize("image", ("ranker", "triton"))
def test_copied_files_exist_in_the_build_context(image: str) -> None:
    for word, rest in dockerfile(image):
        parts = rest.split()
        if word in ("COPY", "ADD") and not any(p.startswith("--from") for p in parts):
            for source in [p for p in parts if not p.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"{image}: COPY {source} does not exist"
                assert not dockerignored(source), f"{image}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_releases_and_the_venv_out() -> None:
    for path in ("releases/example/manifest.json", ".venv/bin/python", "ranker/__pycache__/x.pyc", ".git/HEAD"):
        assert dockerignored(path), path
    assert not dockerignored("ranker/server.py")


# ---------------------------------------------------------------------------------------------
# The images' requirement files


def test_image_requirements_are_generated_from_the_lock() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/runtime_requirements.py", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr


def third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for modules outside the standard library and ranker."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"ranker"}:
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    ("sources", "requirements", "provided"),
    [
        (sorted((ROOT / "ranker").rglob("*.py")), "requirements-ranker.txt", set()),
        ([ROOT / "triton_models" / "onnx_runner.py"], "requirements-triton.txt", {"triton_python_backend_utils"}),
    ],
    ids=["ranker", "triton"],
)
def test_images_install_everything_the_code_imports(sources: list[Path], requirements: str, provided: set[str]) -> None:
    lines = (DOCKER / requirements).read_text().splitlines()
    installed = {line.split("==")[0] for line in lines if line and not line.startswith("#")}
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in third_party_imports(sources).items()
        if module not in provided
        and not {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [])} & installed
    }
    hint = (
        "add them to pyproject's [project.dependencies] and requirements.lock, then run scripts/runtime_requirements.py"
    )
    assert missing == {}, f"{hint}: {missing}"
