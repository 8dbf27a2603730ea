"""docker-compose.yml is valid, and the native cluster runs each of its services with the same
command and settings (only the documented single-host rewrites differ)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dev.devcluster import COMPOSE_FILE, ROOT, load_compose, native_services, read_env_file

ENV_FILE = ROOT / ".env.example"
HA_ENV_FILE = ROOT / "deploy" / "ha.env"
# Each run as `make run` and as `make run-ha` (the ha profile, with deploy/ha.env's settings).
PROFILES = pytest.mark.parametrize("profiles", [(), ("ha",)], ids=["default", "ha"])


def test_compose_file_passes_the_compose_schema() -> None:
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert checker, "check-jsonschema is a dev dependency"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict:  # type: ignore[type-arg]
    return load_compose()


@PROFILES
def test_every_service_runs_natively(compose: dict, tmp_path: Path, profiles: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    native = {s.name: s for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, profiles=profiles)}
    expected = {
        name
        for name, spec in compose["services"].items()
        if not spec.get("profiles") or set(spec["profiles"]) & set(profiles)
    }
    assert set(native) == expected
    assert "load" not in native  # the load profile runs with `make load`, not at start-up
    assert ("sentinel-1" in native) == ("ha" in profiles)


def _rewrite(value: str, services: set[str], mounts: dict[str, Path] | None = None) -> str:
    """The documented rewrite, written independently: `service:port` and `0.0.0.0:port` at the
    start of a value or after `//` become `127.0.0.1:port`; a path under a named volume's mount
    point moves to the volume's folder."""
    hosts = "|".join(re.escape(h) for h in (*services, "0.0.0.0"))
    value = re.sub(rf"(^|//|,)({hosts}):(\d+)", r"\g<1>127.0.0.1:\3", value)
    if value == "0.0.0.0":
        value = "127.0.0.1"
    for target, folder in (mounts or {}).items():
        if value.startswith(target + "/"):
            value = f"{folder}/{value[len(target) + 1 :]}"
    return value


def _interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ${VAR:-default}, written independently (the variables come from the env file)."""
    for match in re.findall(r"\$\{[^}]+\}", value):
        name, _, default = match[2:-1].partition(":-")
        value = value.replace(match, env.get(name) or default)
    return value


@PROFILES
def test_native_commands_and_settings_are_the_compose_ones(
    compose: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profiles: tuple[str, ...]
) -> None:  # type: ignore[type-arg]
    names = set(compose["services"])
    variables = read_env_file(ENV_FILE)
    ha_variables = read_env_file(HA_ENV_FILE)
    for name in {*variables, *ha_variables}:
        monkeypatch.delenv(name, raising=False)  # the shell's settings would win over the file's
    if profiles:
        for name, value in ha_variables.items():
            monkeypatch.setenv(name, value)  # `make run-ha` exports deploy/ha.env
        variables |= ha_variables
    for service in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, profiles=profiles):
        spec = compose["services"][service.name]
        mounts = {
            v.split(":")[1]: tmp_path / service.name for v in spec.get("volumes") or [] if not v.startswith((".", "/"))
        }
        # compose's `$$` is a `$`; a service's name as an argument of its own, before a port, is its host.
        args = [str(arg).replace("$$", "$") for arg in spec["command"]]
        args = [
            "127.0.0.1" if a in names and args[i + 1 : i + 2] != [] and args[i + 1].isdigit() else a
            for i, a in enumerate(args)
        ]
        expected_command = [_rewrite(arg, names, mounts) for arg in args]
        command = list(service.command)
        if expected_command[0] in ("python", "python3"):
            assert command[0] == sys.executable  # the virtualenv's interpreter
        else:
            assert Path(command[0]).name == expected_command[0], service.name
        if spec.get("image", "").startswith("redis"):
            # Natively, the volume is a folder and only loopback is bound.
            assert command[len(expected_command) :] == ["--dir", str(tmp_path / service.name), "--bind", "127.0.0.1"]
            command = command[: len(expected_command)]
        assert command[1:] == expected_command[1:], service.name
        for key, value in (spec.get("environment") or {}).items():
            expected = _rewrite(_interpolate(str(value), variables), names, mounts)
            assert service.env[key] == expected, (service.name, key)
        # .env goes whole only to the services that list it (the allocator gets its tokens alone).
        assert ("IPAM_AWS_SECRET_ACCESS_KEY" in service.env) == (".env" in (spec.get("env_file") or [])), service.name
        assert service.replicas == int((spec.get("deploy") or {}).get("replicas", 1))
        for index, env in enumerate(service.replica_env):
            # Replica i listens for metrics on port + 10 i and is told its number; everything else is shared.
            differing = {k for k in env if env.get(k) != service.env.get(k)}
            if service.replicas > 1:
                assert env["IPAM_REPLICA"] == str(index + 1)
                assert differing <= {"IPAM_METRICS_ADDRESS", "IPAM_REPLICA"}
            else:
                assert not differing
            if index == 0:
                assert differing <= {"IPAM_REPLICA"}


def test_ports_can_be_moved_as_a_whole(compose: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    moved = {
        s.name: s
        for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, port_map={6379: 16379, 50051: 15051})
    }
    assert moved["redis"].command[1:3] == ["--port", "16379"]
    assert moved["allocator"].env["IPAM_REDIS_URL"] == "redis://127.0.0.1:16379/0"
    assert moved["allocator"].env["IPAM_GRPC_ADDRESS"] == "127.0.0.1:15051"
    assert moved["worker"].env["IPAM_GRPC_ADDRESS"] == "127.0.0.1:15051"
    assert "127.0.0.1:15051" in moved["seed"].command


@PROFILES
def test_start_order_follows_depends_on(compose: dict, tmp_path: Path, profiles: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    services = native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, profiles=profiles)
    order = [s.name for s in services]
    for name, spec in compose["services"].items():
        if name not in order:
            continue
        for dependency, condition in (spec.get("depends_on") or {}).items():
            if dependency not in order:  # a service of a profile that is off: compose leaves it out
                assert condition.get("required") is False, (name, dependency)
                assert dependency not in next(s for s in services if s.name == name).depends_on
                continue
            assert order.index(dependency) < order.index(name)


def test_a_port_offset_moves_every_port(compose: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    plain = {s.name: s for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, profiles=["ha"])}
    moved = {
        s.name: s
        for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, port_offset=1000, profiles=["ha"])
    }
    for name, service in plain.items():
        assert moved[name].ports == [port + 1000 for port in service.ports], name
    assert moved["allocator"].env["IPAM_GRPC_ADDRESS"] == "127.0.0.1:51051"
    assert moved["worker"].replica_env[1]["IPAM_METRICS_ADDRESS"] == "127.0.0.1:10210"
    assert "http://127.0.0.1:6000" in moved["seed"].command
    assert moved["redis-replica"].command[-6:-4] == ["127.0.0.1", "7379"]
    assert moved["sentinel-2"].ports == [27380]


def test_the_compose_file_publishes_on_loopback_and_keeps_the_cloud_keys_from_the_allocator(compose: dict) -> None:  # type: ignore[type-arg]
    for name, spec in compose["services"].items():
        for mapping in spec.get("ports") or []:
            assert str(mapping).startswith("${IPAM_PUBLISH_ADDRESS:-127.0.0.1}:"), (name, mapping)
    assert ".env" not in (compose["services"]["allocator"].get("env_file") or [])
    assert compose["services"]["allocator"]["build"]["target"] == "runtime"
    assert not any("ipam-allocator-" in str(arg) for arg in compose["services"]["load"]["command"])


def _dockerfile_stage(name: str) -> str:
    """The lines of one stage of the Dockerfile (from its FROM to the next)."""
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    return next(s for s in stages if re.match(rf"\S+ AS {name}\b", s))


def test_development_tools_stay_out_of_the_runtime_image(compose: dict) -> None:  # type: ignore[type-arg]
    assert "COPY dev " not in _dockerfile_stage("runtime")
    assert "COPY dev ./dev" in _dockerfile_stage("dev")
    for name, spec in compose["services"].items():
        commands = [spec.get("command") or [], (spec.get("healthcheck") or {}).get("test") or []]
        if any(str(arg).startswith("dev.") for command in commands for arg in command):
            assert spec["build"]["target"] == "dev", name


def test_the_ha_profile_finds_the_master_through_the_sentinels(
    compose: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[type-arg]
    for name, value in read_env_file(HA_ENV_FILE).items():
        monkeypatch.setenv(name, value)
    native = {s.name: s for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path, profiles=["ha"])}
    sentinels = "127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381"
    for service in ("allocator", "worker"):
        assert native[service].env["IPAM_REDIS_SENTINELS"] == sentinels
        assert native[service].env["IPAM_REDIS_SENTINEL_MASTER"] == "ipam"
    assert native["allocator"].env["IPAM_REDIS_MIN_REPLICAS"] == "1"
    assert {"sentinel-1", "sentinel-2", "sentinel-3"} <= set(native["allocator"].depends_on)
    assert native["redis-replica"].command[-6:-4] == ["127.0.0.1", "6379"]
    for index, port in enumerate(("26379", "26380", "26381"), start=1):
        sentinel = native[f"sentinel-{index}"]
        assert sentinel.env["SENTINEL_PRIMARY"] == "127.0.0.1:6379"
        assert sentinel.env["SENTINEL_CONF"] == str(tmp_path / f"sentinel-{index}" / "sentinel.conf")
        assert "$$" not in sentinel.command[2]
        assert sentinel.command[3:] == [
            "sentinel",
            "--port",
            port,
            "--dir",
            str(tmp_path / sentinel.name),
            "--bind",
            "127.0.0.1",
        ]
