"""ipamctl's parser as people use CLIs: global flags anywhere, and each setting from the flag, else
the environment, else the config file, else the default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clients.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT
from clients.ipamctl import Settings, UsageError, build_parser, config_path, read_config, resolve_settings

FLAGS = ["--token", "T", "--address", "h:1", "--timeout", "3", "-o", "json"]


@pytest.mark.parametrize(
    "argv",
    [
        [*FLAGS, "nodes", "list"],
        ["nodes", "list", *FLAGS],
        ["nodes", *FLAGS[:4], "list", *FLAGS[4:]],
        ["--token", "T", "nodes", "list", "--address", "h:1", "--timeout", "3", "--json"],
        ["node", "show", "n1", *FLAGS],
        ["events", "replay", "--all", *FLAGS],
        [*FLAGS[:2], "allocate", "n1", "--owner", "o", *FLAGS[2:]],
    ],
)
def test_global_flags_work_before_between_and_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args, {}, {})
    assert settings == Settings(address="h:1", token="T", timeout=3.0)
    assert args.output == "json" or args.json


def test_a_flag_after_the_command_does_not_reset_one_before_it() -> None:
    args = build_parser().parse_args(["--token", "T", "-o", "json", "status"])
    assert (args.token, args.output) == ("T", "json")


FILE = {"token": "from-file", "address": "file:3", "timeout": "7"}
ENV = {"IPAM_TOKEN": "from-env", "IPAM_GRPC_ADDRESS": "env:2", "IPAM_TIMEOUT": "5"}


@pytest.mark.parametrize(
    "argv,environ,config,expected",
    [
        ([], {}, {}, Settings(DEFAULT_ADDRESS, None, DEFAULT_TIMEOUT)),
        ([], {}, FILE, Settings("file:3", "from-file", 7.0)),
        ([], ENV, FILE, Settings("env:2", "from-env", 5.0)),
        (["--token", "flag", "--address", "flag:1", "--timeout", "1"], ENV, FILE, Settings("flag:1", "flag", 1.0)),
        (["--token", "flag"], ENV, FILE, Settings("env:2", "flag", 5.0)),
        ([], {"IPAM_TOKEN": ""}, FILE, Settings("file:3", "from-file", 7.0)),  # an empty variable is unset
        ([], {"IPAM_TOKEN": "from-env"}, {}, Settings(DEFAULT_ADDRESS, "from-env", DEFAULT_TIMEOUT)),
    ],
)
def test_flag_beats_environment_beats_config_file_beats_default(
    argv: list[str], environ: dict[str, str], config: dict[str, str], expected: Settings
) -> None:
    args = build_parser().parse_args([*argv, "ping"])
    assert resolve_settings(args, environ, config) == expected


def test_the_config_file_format_and_where_it_is(tmp_path: Path) -> None:
    text = "# ipamctl\ntoken = 's3cret'\n\naddress=10.0.0.1:50051\nnonsense\n"
    assert read_config(text) == {"token": "s3cret", "address": "10.0.0.1:50051"}
    assert config_path("/x/c", {"IPAM_CONFIG": "/y"}) == Path("/x/c")
    assert config_path(None, {"IPAM_CONFIG": "/y"}) == Path("/y")
    assert config_path(None, {}) == Path("~/.config/ipam/config").expanduser()


def test_a_bad_timeout_in_the_environment_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_settings(build_parser().parse_args(["ping"]), {"IPAM_TIMEOUT": "soon"}, {})


def test_every_argument_has_help_and_every_command_an_example_and_a_role() -> None:
    parser = build_parser()

    def walk(p):  # type: ignore[no-untyped-def]
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    for p in walk(parser):
        for action in p._actions:
            if action.dest not in ("help", "version") and not isinstance(action, argparse._SubParsersAction):
                assert action.help, (p.prog, action.dest)
        if p.get_default("handler") is not None:
            assert "example:" in (p.epilog or ""), p.prog
            assert "Role: " in (p.description or ""), p.prog


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("ipamctl ")
