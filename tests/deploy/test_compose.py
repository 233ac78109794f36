"""The deploy files, checked without a container engine: compose files, Dockerfiles, systemd unit.

Every compose file (base, dev overlay, the N-client overlay ``fedser testbed prepare`` writes)
is loaded with pyyaml and held to the rules of the test bed: declared secrets, pinned images,
unprivileged users, health checks, restart policies. The network-namespace runner must read
exactly these files: the merged view of ``deploy/compose.py`` is compared with the files
themselves. ``docker compose config`` runs too where Docker's compose plugin is installed. The
compose side of ``fedser testbed`` (``deploy/testbed.py``: files, engine) and how the command
finds the deploy folder are checked here too.
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedser.common import processes
from fedser.common.errors import ConfigError
from fedser.tools.commands import testbed

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
BASE = DEPLOY / "docker-compose.yml"
DEV = DEPLOY / "docker-compose.dev.yml"
SERVICES = {"superlink", "serverapp", "client-1", "client-2", "client-3"}


def _doc(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _image_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return bool(tag) and tag != "latest" or "@sha256:" in image


def _check_service_rules(name: str, svc: dict, declared_secrets: set[str]) -> list[str]:
    problems = []
    if not _image_pinned(str(svc.get("image", ""))):
        problems.append(f"{name}: image {svc.get('image')!r} is not pinned to a version")
    if svc.get("privileged"):
        problems.append(f"{name}: privileged")
    user = str(svc.get("user", ""))
    if not user or user.split(":")[0] in ("0", "root"):
        problems.append(f"{name}: user {user!r} is not an unprivileged user")
    if "healthcheck" not in svc or not svc["healthcheck"].get("test"):
        problems.append(f"{name}: no healthcheck")
    if svc.get("restart") not in ("unless-stopped", "on-failure", "always"):
        problems.append(f"{name}: restart {svc.get('restart')!r}")
    if "ALL" not in svc.get("cap_drop", []):
        problems.append(f"{name}: capabilities not dropped")
    for s in svc.get("secrets", []):
        source = s["source"] if isinstance(s, dict) else s
        if source not in declared_secrets:
            problems.append(f"{name}: secret {source!r} is not declared")
    return problems


# ---------------------------------------------------------------- the files as written

def test_base_compose_file_follows_the_test_bed_rules():
    # Prepare
    doc = _doc(BASE)

    # Execute
    problems = []
    for name, svc in doc["services"].items():
        problems += _check_service_rules(name, svc, set(doc["secrets"]))

    # Assert
    assert set(doc["services"]) == SERVICES
    assert problems == []
    for name, spec in doc["secrets"].items():
        assert spec["file"].startswith("${FEDSER_TESTBED:-./testbed}/"), name
    # TLS and SuperNode authentication on in the base file, never plain text.
    link = doc["services"]["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(link)
    for name, svc in doc["services"].items():
        assert "--insecure" not in svc["command"], name
    for i in (1, 2, 3):
        client = doc["services"][f"client-{i}"]
        assert client["environment"]["FEDSER_AUTH_KEY"] == f"/run/secrets/client-{i}.key"
        # A device sees its own key and nobody else's.
        assert sorted(client["secrets"]) == ["ca.pem", f"client-{i}.key"]
        assert any(v.endswith(":/data:ro") for v in client["volumes"])
    server_secrets = set(doc["services"]["superlink"]["secrets"]) | set(doc["services"]["serverapp"]["secrets"])
    assert not any(s.startswith("client-") for s in server_secrets)
    # Every device has its own tier and budget.
    tiers = {doc["services"][f"client-{i}"]["environment"]["FEDSER_TIER"] for i in (1, 2, 3)}
    assert tiers == {"1.0", "0.5", "0.25"}


def test_dev_overlay_is_plain_text_only_and_adds_nothing_else():
    # Prepare
    doc = _doc(DEV)

    # Assert
    assert set(doc["services"]) <= SERVICES
    assert "secrets" not in doc and "volumes" not in doc
    for name, svc in doc["services"].items():
        assert "--insecure" in svc["command"], name
        assert set(svc) <= {"command", "environment"}, name
        assert "--enable-supernode-auth" not in svc["command"]


def test_runner_reads_the_commands_the_compose_files_hold(compose, tmp_path):
    # Prepare
    env = {"FEDSER_TESTBED": str(tmp_path), "FEDSER_ROUNDS": "7"}

    # Execute
    base = compose.services_from(compose.load_compose([BASE], env))
    dev = compose.services_from(compose.load_compose([BASE, DEV], env))

    # Assert: the same argv as the file, interpolated.
    raw = _doc(BASE)["services"]
    for name in SERVICES:
        assert base[name].command == [compose.interpolate(c, env) for c in raw[name]["command"]], name
    assert base["serverapp"].command[base["serverapp"].command.index("--rounds") + 1] == "7"
    assert base["serverapp"].command[base["serverapp"].command.index("--min-clients") + 1] == "3"
    secrets = {m.target: m.source for m in base["client-2"].mounts if m.target.startswith("/run/secrets/")}
    assert secrets == {"/run/secrets/ca.pem": f"{tmp_path}/secrets/ca.pem",
                       "/run/secrets/client-2.key": f"{tmp_path}/secrets/client-2.key"}
    data = next(m for m in base["client-2"].mounts if m.target == "/data")
    assert data.read_only and data.source == f"{tmp_path}/client-2/data"
    assert base["client-2"].environment["FEDSER_TIER"] == "0.5" and base["client-2"].user == "10001:10001"
    assert compose.start_order(base)[0] == "superlink"
    # The overlay replaces commands and merges environments, as compose does.
    assert "--insecure" in dev["client-1"].command and dev["client-1"].environment["FEDSER_AUTH_KEY"] == ""
    assert dev["client-1"].environment["FEDSER_TIER"] == "1.0"
    assert dev["superlink"].mounts == base["superlink"].mounts


@pytest.mark.parametrize("text, env, expected", [
    ("${A:-x}", {}, "x"), ("${A:-x}", {"A": ""}, "x"), ("${A-x}", {"A": ""}, ""), ("${A}/b", {"A": "/a"}, "/a/b"),
    ("$$HOME", {}, "$HOME"), ("k=${A:?set A}", {"A": "3"}, "k=3"), ("$A", {"A": "v"}, "v"),
])
def test_runner_interpolates_like_compose(compose, text, env, expected):
    assert compose.interpolate(text, env) == expected


def test_runner_refuses_what_compose_would_refuse(compose, tmp_path):
    # Prepare
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"services": {
        "a": {"image": "x:1", "command": ["true"], "secrets": ["nope"], "depends_on": ["ghost"]},
        "b": {"image": "x:1", "volumes": ["named:/data"], "command": "true"},
        "c": {"image": "x:1"}}}))
    required = tmp_path / "required.yml"
    required.write_text("services:\n  a:\n    command: ['${NEEDED:?set NEEDED}']\n")

    # Execute / Assert
    with pytest.raises(compose.ComposeError) as err:
        compose.services_from(compose.load_compose([bad], {}))
    message = str(err.value)
    assert "secret 'nope'" in message and "'ghost'" in message and "not a bind mount" in message
    assert "service c: no command" in message
    with pytest.raises(compose.ComposeError, match="NEEDED is required"):
        compose.load_compose([required], {})
    with pytest.raises(compose.ComposeError, match="no such compose file"):
        compose.load_compose([tmp_path / "missing.yml"], {})


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0, reason="docker compose not installed")
@pytest.mark.parametrize("files", [[BASE], [BASE, DEV]], ids=["base", "dev"])
def test_docker_compose_accepts_the_files(files, tmp_path):
    # Prepare: the secret files must exist for compose to validate them.
    (tmp_path / "secrets").mkdir()
    for name in _doc(BASE)["secrets"]:
        (tmp_path / "secrets" / name).write_text("x")

    # Execute
    done = subprocess.run(["docker", "compose", *sum((["-f", str(f)] for f in files), []), "config", "-q"],
                          capture_output=True, text=True, env={"FEDSER_TESTBED": str(tmp_path), "PATH": "/usr/bin:/bin:/usr/local/bin"})

    # Assert
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- prepare: N devices

@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bed") / "testbed"
    meta = testbed.prepare(out, 5, [str(tiny_corpus / "commands"), str(tiny_corpus / "emotion")], test=0.0,
                           tiers="0.25", max_epsilon=2.0, deploy_dir=DEPLOY)
    return out, meta


def test_prepare_writes_volumes_keys_and_an_overlay_for_more_devices(prepared, compose, deploy_testbed):
    # Prepare
    out, meta = prepared

    # Execute
    doc = compose.load_compose([BASE, out / deploy_testbed.CLIENTS_OVERLAY], {"FEDSER_TESTBED": str(out)})
    services = compose.services_from(doc)
    overlay = _doc(out / deploy_testbed.CLIENTS_OVERLAY)

    # Assert: devices 4 and 5 are client-1's definition with their own key, volumes and settings.
    assert set(services) == SERVICES | {"client-4", "client-5"}
    problems = []
    for name, svc in overlay["services"].items():
        problems += _check_service_rules(name, svc, set(_doc(BASE)["secrets"]) | set(overlay["secrets"]))
    assert problems == []
    c5 = services["client-5"]
    assert c5.command == services["client-1"].command
    assert c5.environment["FEDSER_TIER"] == "0.25" and c5.environment["FEDSER_MAX_EPSILON"] == "2.0"
    assert {m.target: m.source for m in c5.mounts}["/run/secrets/client-5.key"] == str(out / "secrets" / "client-5.key")
    assert {m.target: m.source for m in c5.mounts}["/data"] == str(out / "client-5" / "data")
    for name in services:
        for m in services[name].mounts:
            assert Path(m.source).exists(), (name, m)
    # Data volumes: each device's audio, and a manifest that names it relative to itself.
    from fedser.common.corpora import load_corpus

    speakers = []
    for i in range(1, 6):
        corpus = load_corpus(out / f"client-{i}" / "data" / "data.csv")
        assert corpus.utterances and not corpus.skipped
        assert all(Path(u.path).is_relative_to(out / f"client-{i}" / "data") for u in corpus.utterances)
        assert (out / f"client-{i}" / "data" / "data.csv").read_text().splitlines()[1].startswith("audio/")
        speakers.append({u.speaker for u in corpus.utterances})
    assert all(a.isdisjoint(b) for i, a in enumerate(speakers) for b in speakers[i + 1:])
    # One registered key per device; the CA key never enters a container.
    keys = (out / "secrets" / "supernodes.pub").read_text().splitlines()
    assert len(keys) == 5 and all(k.startswith("ecdsa-sha2-nistp384 ") for k in keys)
    assert not (out / "secrets" / "ca.key").exists() and (out / "ca" / "ca.key").exists()
    assert meta["clients"] == 5


def test_prepare_server_certificate_names_the_superlink_service(prepared):
    # Prepare
    from cryptography import x509

    out, _ = prepared
    cert = x509.load_pem_x509_certificate((out / "secrets" / "server.pem").read_bytes())

    # Assert
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "superlink" in names


def test_prepare_refuses_bad_settings_and_an_existing_bed(prepared, tiny_corpus, tmp_path):
    # Prepare
    out, _ = prepared
    data = [str(tiny_corpus / "commands")]

    # Execute / Assert: every problem at once.
    with pytest.raises(ConfigError) as err:
        testbed.prepare(tmp_path / "x", 2, data, tiers="0.3", max_epsilon=0, uid=0)
    message = str(err.value)
    assert "--clients 2" in message and "--tiers" in message and "--max-epsilon" in message and "--uid 0" in message
    with pytest.raises(ConfigError, match="already holds a test bed"):
        testbed.prepare(out, 3, data)
    with pytest.raises(ConfigError, match="only .* training speakers"):
        testbed.prepare(tmp_path / "y", 40, data, deploy_dir=DEPLOY)


def test_up_refuses_an_unprepared_folder(tmp_path):
    # Prepare
    from fedser.tools.cli import main

    # Execute
    code = main(["testbed", "up", "--testbed", str(tmp_path), "--rounds", "0"])

    # Assert
    assert code == 2


@pytest.mark.parametrize("action", ["prepare", "up"])
def test_a_missing_deploy_folder_is_named_with_its_option(action, tmp_path, capsys):
    # Prepare: a folder without the compose files, as an installed fedser without a checkout has.
    from fedser.tools.cli import main

    argv = {"prepare": ["--out", str(tmp_path / "bed")], "up": ["--testbed", str(tmp_path / "bed")]}[action]

    # Execute
    code = main(["testbed", action, *argv, "--deploy-dir", str(tmp_path)])

    # Assert: refused before anything is written, saying which option points at the folder.
    assert code == 2
    err = capsys.readouterr().err
    assert f"--deploy-dir {tmp_path} is not a deploy folder" in err and "docker-compose.yml" in err
    assert not (tmp_path / "bed").exists()
    assert testbed.find_deploy_dir() == DEPLOY


def test_up_lists_the_bed_files_and_picks_an_engine(deploy_testbed, tmp_path, monkeypatch):
    # Prepare: a bed with the N-client overlay, and no compose engine installed.
    (tmp_path / deploy_testbed.CLIENTS_OVERLAY).write_text("services: {}\n")
    monkeypatch.setattr(deploy_testbed, "docker_compose", lambda: None)

    # Execute
    files = deploy_testbed.compose_files(tmp_path, dev=True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    netns = deploy_testbed.choose_engine(files, tmp_path, "auto")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env = deploy_testbed.compose_env(tmp_path, rounds=2, min_clients=3, local_epochs=1)

    # Assert: base first, then the bed's overlay, then dev; without Docker, the runner beside the files.
    assert files == [BASE, tmp_path / deploy_testbed.CLIENTS_OVERLAY, DEV]
    assert netns.argv == [sys.executable, str(DEPLOY / "netns_runner.py"), "up", "-f", str(BASE),
                          "-f", str(files[1]), "-f", str(DEV), "--workdir", str(tmp_path / "netns")]
    assert netns.logs == str(tmp_path / "netns" / "logs")
    with pytest.raises(ConfigError, match="docker compose is not installed"):
        deploy_testbed.choose_engine(files, tmp_path, "docker")
    with pytest.raises(ConfigError, match="needs root"):
        deploy_testbed.choose_engine(files, tmp_path, "netns")
    assert env["FEDSER_TESTBED"] == str(tmp_path) and env["FEDSER_ROUNDS"] == "2" and env["FEDSER_UID"]
    assert env["BUILDAH_FORMAT"] == "docker", "podman keeps the images' HEALTHCHECK"


@pytest.fixture()
def fresh_bed(tiny_corpus, tmp_path):
    out = tmp_path / "testbed"
    testbed.prepare(out, 3, [str(tiny_corpus / "commands"), str(tiny_corpus / "emotion")], test=0.0,
                    deploy_dir=DEPLOY)
    return out


def test_preflight_names_the_service_and_the_fix_for_each_problem(fresh_bed, deploy_testbed):
    # Prepare: a secret gone, a device without its data, the Fleet API's host port taken.
    import socket

    files = deploy_testbed.compose_files(fresh_bed)
    env = deploy_testbed.compose_env(fresh_bed, rounds=1, min_clients=3, local_epochs=1)
    clean = deploy_testbed.preflight(files, {**env, "FEDSER_FLEET_PORT": str(processes.free_port())}, fresh_bed)
    (fresh_bed / "secrets" / "client-2.key").unlink()
    (fresh_bed / "client-3" / "data" / "data.csv").unlink()
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]

    # Execute
    try:
        problems = deploy_testbed.preflight(files, {**env, "FEDSER_FLEET_PORT": str(port)}, fresh_bed)
        unpublished = deploy_testbed.preflight(files, {**env, "FEDSER_FLEET_PORT": str(port)}, fresh_bed,
                                               check_ports=False)
    finally:
        holder.close()

    # Assert: nothing for a prepared bed; then one line per problem, each naming its service and a fix.
    assert clean == []
    assert len(problems) == 3, problems
    taken, secret, data = sorted(problems, key=lambda p: ("superlink" not in p, p))
    assert secret.startswith("service client-2: secret client-2.key is missing") and "testbed prepare" in secret
    assert data.startswith("service client-3: no data volume at ") and "--data CORPUS" in data
    assert taken.startswith(f"service superlink: host port {port} is already in use") and "FEDSER_FLEET_PORT" in taken
    assert unpublished == [secret, data], "the namespace runner publishes no host port"


@pytest.mark.parametrize("spec, port", [("9092:9092", 9092), ("127.0.0.1:9093:9092", 9093), ("9092", None),
                                        ("9094:9092/tcp", 9094), ({"target": 9092, "published": "9095"}, 9095),
                                        ({"target": 9092}, None)])
def test_preflight_reads_every_form_of_a_published_port(deploy_testbed, spec, port):
    assert deploy_testbed._host_port(spec) == port


def test_up_refuses_a_bed_that_cannot_start_before_any_container(fresh_bed, deploy_testbed, monkeypatch, capsys):
    # Prepare: an engine that must never be reached.
    from fedser.tools.cli import main

    (fresh_bed / "secrets" / "ca.pem").unlink()
    monkeypatch.setattr(deploy_testbed, "docker_compose", lambda: ["docker", "compose"])
    monkeypatch.setattr(deploy_testbed, "run_until_done", lambda *a: pytest.fail("the engine was started"))
    monkeypatch.setenv("FEDSER_FLEET_PORT", str(processes.free_port()))

    # Execute
    code = main(["testbed", "up", "--testbed", str(fresh_bed), "--rounds", "1", "--deploy-dir", str(DEPLOY)])

    # Assert: every service that mounts the CA is named.
    err = capsys.readouterr().err
    assert code == 2 and "the test bed cannot start" in err
    assert all(f"service {name}: secret ca.pem is missing" in err for name in SERVICES), err


def test_up_builds_each_image_once_before_the_project_and_stops_when_it_fails(fresh_bed, deploy_testbed,
                                                                            monkeypatch, capsys):
    # Prepare: a compose engine whose build fails.
    from fedser.tools.cli import main

    calls = []
    monkeypatch.setattr(deploy_testbed, "docker_compose", lambda: ["podman-compose"])
    monkeypatch.setattr(deploy_testbed, "run_until_done", lambda argv, env: calls.append(argv) or 1)
    monkeypatch.setenv("FEDSER_FLEET_PORT", str(processes.free_port()))

    # Execute
    code = main(["testbed", "up", "--testbed", str(fresh_bed), "--rounds", "1", "--deploy-dir", str(DEPLOY)])

    # Assert: the build ran alone; the project was never brought up.
    assert code != 0 and "building an image failed (exit 1)" in capsys.readouterr().err
    assert calls == [["podman-compose", "-f", str(DEPLOY / "docker-compose.yml"), "build", "superlink"]]


def test_podman_compose_is_found_beside_this_python(deploy_testbed, tmp_path, monkeypatch):
    # Prepare: no engine on PATH; podman-compose installed into the environment fedser runs from.
    env_bin, empty = tmp_path / "venv-bin", tmp_path / "empty"
    env_bin.mkdir()
    empty.mkdir()
    tool = env_bin / "podman-compose"
    tool.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 'podman-compose version 1.6.0'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(env_bin / "python"))

    # Execute
    found = deploy_testbed.docker_compose()
    engine = deploy_testbed.choose_engine([BASE], tmp_path, "docker")

    # Assert
    assert found == [str(tool)]
    assert engine.argv[:4] == [str(tool), "-f", str(BASE), "up"] and "--build" not in engine.argv
    assert engine.publishes_ports
    # Each image is built once, first, one after the other (not once per service, all at the same time).
    assert engine.builds == ([str(tool), "-f", str(BASE), "build", "superlink"],
                             [str(tool), "-f", str(BASE), "build", "client-1"])


def test_netns_runner_script_prints_the_merged_project(tmp_path):
    # Execute: the script's own entry point, as the docs run it (its modules import each other from deploy/).
    done = subprocess.run([sys.executable, str(DEPLOY / "netns_runner.py"), "config", "-f", str(BASE), "-f", str(DEV)],
                          capture_output=True, text=True, env={**os.environ, "FEDSER_TESTBED": str(tmp_path)},
                          cwd=tmp_path, timeout=60)

    # Assert
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)
    assert set(merged["services"]) == SERVICES
    assert "--insecure" in merged["services"]["client-1"]["command"]
    assert merged["secrets"]["ca.pem"]["file"] == f"{tmp_path}/secrets/ca.pem"


# ---------------------------------------------------------------- images

def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per build stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("role, extra, other", [("server", "server", "client"), ("client", "client", "server")])
def test_dockerfiles_are_multi_stage_pinned_unprivileged_and_install_one_extra(role, extra, other):
    # Prepare
    path = DEPLOY / f"Dockerfile.{role}"
    stages = _stages(path)
    text = "\n".join(sum(stages, []))

    # Assert
    assert len(stages) >= 2, "multi-stage: a builder, and a runtime that copies its result"
    base = re.search(r"^ARG BASE=(\S+)$", path.read_text(), re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1)), base
    for stage in stages:
        assert stage[0].split()[1] == "${BASE}", "every stage builds on the one base a build may replace"
    runtime = stages[-1]
    users = [ln.split()[1] for ln in runtime if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(ln.upper().startswith("HEALTHCHECK ") for ln in runtime)
    assert any(ln.upper().startswith("COPY --FROM=") for ln in runtime)
    assert f".[{extra}]" in text and f"[{other}" not in text and "[dev" not in text
    assert "download.pytorch.org/whl/cpu" in text and "torch==2.11.0" in text
    assert "-c constraints.txt" in text and "constraints.txt" in text.split("COPY pyproject.toml", 1)[1].split("\n")[0]
    assert "pip install" not in "\n".join(runtime), "the runtime stage installs nothing itself"
    # An air-gapped build: every install takes the wheelhouse options and sees the wheelhouse.
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert len(installs) == 2 and all("${PIP_ARGS}" in ln and "--mount=type=bind,source=deploy/wheels" in ln
                                      for ln in installs), installs
    assert (REPO / "deploy" / "wheels" / "README.md").is_file()


def test_compose_build_arguments_default_to_the_dockerfiles_own(compose):
    # Prepare: the build arguments as compose reads them with no FEDSER_* variable set.
    doc = compose.load_compose([BASE], {})

    # Assert: a plain `docker compose up --build` builds exactly what `docker build` builds.
    for name, svc in doc["services"].items():
        text = (REPO / svc["build"]["dockerfile"]).read_text()
        defaults = {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", text, re.M)}
        assert svc["build"]["args"] == defaults, name
    air_gapped = compose.load_compose([BASE], {"FEDSER_BASE_IMAGE": "localhost/base:1", "FEDSER_TORCH_INDEX": "",
                                               "FEDSER_PIP_ARGS": "--no-index --find-links /wheels"})
    assert air_gapped["services"]["client-1"]["build"]["args"] == {
        "BASE": "localhost/base:1", "PIP_ARGS": "--no-index --find-links /wheels", "TORCH_INDEX": ""}


def test_dockerignore_keeps_the_build_context_small():
    # Prepare
    patterns = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}

    # Assert
    assert {".venv", ".git", "runs", "tests", "deploy/testbed"} <= {p.strip("/*") for p in patterns}


# ---------------------------------------------------------------- device agent unit

def test_systemd_unit_runs_the_agent_unprivileged_and_restarts_it():
    # Prepare
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "fedser-client.service")
    service = unit["Service"]

    # Assert
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "true" and service["PrivateTmp"] == "true"
    assert "CapabilityBoundingSet" in service and service["CapabilityBoundingSet"] == ""
    assert service["ReadWritePaths"] == "/var/lib/fedser"
    assert "fedser-client start" in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze(tmp_path):
    # Prepare: systemd-analyze checks that ExecStart exists, so point it at a stand-in.
    text = (DEPLOY / "fedser-client.service").read_text().replace("/opt/fedser/bin/fedser-client", "/bin/true")
    unit = tmp_path / "fedser-client.service"
    unit.write_text(text)

    # Execute
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)

    # Assert: no complaint about this unit (the host's own units may add noise of their own).
    complaints = [ln for ln in (done.stdout + done.stderr).splitlines() if "fedser-client.service" in ln]
    assert complaints == [], complaints
