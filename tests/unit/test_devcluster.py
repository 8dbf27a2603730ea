"""docker-compose.yml is valid, and the native cluster runs each of its services with the same
command and settings (only the documented single-host rewrites differ)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.devcluster import COMPOSE_FILE, ROOT, load_compose, native_services

ENV_FILE = ROOT / ".env.example"


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


def test_every_service_runs_natively(compose: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    native = {s.name: s for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path)}
    always_on = {name for name, spec in compose["services"].items() if not spec.get("profiles")}
    assert set(native) == always_on
    assert "load" not in native  # the load profile runs with `make load`, not at start-up


def _rewrite(value: str, services: set[str]) -> str:
    """The documented rewrite, written independently: `service:port` and `0.0.0.0:port` at the
    start of a value or after `//` become `127.0.0.1:port`."""
    hosts = "|".join(re.escape(h) for h in (*services, "0.0.0.0"))
    return re.sub(rf"(^|//)({hosts}):(\d+)", r"\g<1>127.0.0.1:\3", value)


def test_native_commands_and_settings_are_the_compose_ones(compose: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    names = set(compose["services"])
    for service in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path):
        spec = compose["services"][service.name]
        expected_command = [_rewrite(str(arg), names) for arg in spec["command"]]
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
            assert service.env[key] == _rewrite(str(value), names), (service.name, key)
        assert service.replicas == int((spec.get("deploy") or {}).get("replicas", 1))
        for index, env in enumerate(service.replica_env):
            # Replica i listens for metrics on port + 10 i; everything else is shared.
            differing = {k for k in env if env[k] != service.env[k]}
            assert differing <= {"IPAM_METRICS_ADDRESS"}
            if index == 0:
                assert not differing


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


def test_start_order_follows_depends_on(compose: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    order = [s.name for s in native_services(compose, env_file=ENV_FILE, data_dir=tmp_path)]
    for name, spec in compose["services"].items():
        if name not in order:
            continue
        for dependency in spec.get("depends_on") or {}:
            assert order.index(dependency) < order.index(name)
