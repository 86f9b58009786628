"""The systemd unit template of a site's SuperNode and its two example configuration files.

The unit is read with a small parser of systemd's syntax (sections, ``key=value``, repeated
keys, lines continued with a backslash), its ``ExecStart`` expanded as systemd would for the
instance ``north`` with the example environment file, and the result parsed by the parsers
``fedseg-supernode`` itself uses: fedseg's options, then flower-supernode's.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from flwr.common.config import parse_config_args
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from client.supernode import _parser as fedseg_parser

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "client" / "systemd"
UNIT = SYSTEMD / "fedseg-supernode@.service"
ENV_EXAMPLE = SYSTEMD / "supernode.env.example"
NODE_EXAMPLE = SYSTEMD / "node.toml.example"
SITE = "north"
FEDSEG_KEYS = ("fedseg-contract", "fedseg-site-name", "fedseg-site-dir")


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Return ``section -> key -> values`` (systemd keys may repeat) of a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} comes before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_env_file(path: Path) -> dict[str, str]:
    """Return the ``VAR=value`` assignments of an environment file (comments skipped)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name == name.strip(), f"{path}: {line!r} is not VAR=value"
            env[name] = value
    return env


def expand(command: str, *, instance: str, env: dict[str, str]) -> list[str]:
    """Split an ``ExecStart`` line as systemd does, for one instance and environment.

    ``%i`` is the instance, ``${VAR}`` one argument, a lone ``$VAR`` zero or more arguments
    (split at whitespace); an unset variable is empty (systemd.service(5), "Command lines").
    """
    argv: list[str] = []
    for word in shlex.split(command.replace("%i", instance)):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            argv.extend(env.get(lone.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return read_unit(UNIT)["Service"]


@pytest.fixture(scope="module")
def unit_environment(service) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in service["Environment"]:
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


@pytest.fixture(scope="module")
def argv(service, unit_environment) -> list[str]:
    (command,) = service["ExecStart"]
    return expand(command, instance=SITE, env=unit_environment | read_env_file(ENV_EXAMPLE))


def _option_value(argv: list[str], option: str) -> str:
    (i,) = [i for i, arg in enumerate(argv) if arg == option]
    return argv[i + 1]


def test_unit_runs_as_the_unprivileged_fedseg_user_and_always_restarts(service):
    assert service["User"] == ["fedseg"]
    assert service["Group"] == ["fedseg"]
    # not "on-failure": a SuperNode whose SuperLink restarted without its registrations exits
    # with status 0, and must come back once the operator registers its key again
    assert service["Restart"] == ["always"]
    assert service["RestartSec"] == ["10"]
    assert service["EnvironmentFile"] == ["/etc/fedseg/%i/supernode.env"]


def test_exec_start_runs_fedseg_supernode_by_absolute_path(service):
    (command,) = service["ExecStart"]
    written = shlex.split(command)[0]

    assert PurePosixPath(written).name == "fedseg-supernode"
    # systemd refuses a variable in the program ("Neither a valid executable name nor an
    # absolute path"), so the path must be written out.
    assert PurePosixPath(written).is_absolute() and "$" not in written


def test_every_option_of_exec_start_is_one_fedseg_supernode_accepts(argv):
    known = set(fedseg_parser()._option_string_actions) \
        | set(_parse_args_run_supernode()._option_string_actions)
    options = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")]

    assert options, "ExecStart passes no options"
    assert [o for o in options if o not in known] == []


def test_exec_start_parses_as_the_site_files_of_the_instance(argv):
    env = read_env_file(ENV_EXAMPLE)

    ours, flower_args = fedseg_parser().parse_known_args(argv[1:])
    flower = _parse_args_run_supernode().parse_args(flower_args)

    assert ours.help is False
    assert flower.superlink == env["FEDSEG_SUPERLINK"]
    assert flower.port == int(env["FEDSEG_RUNTIME_PORT"])
    assert flower.root_certificates == f"/etc/fedseg/{SITE}/ca.crt"
    assert flower.auth_supernode_private_key == f"/etc/fedseg/{SITE}/auth.key"
    # A path ending in .toml is read by Flower as a file whose keys become the node config.
    assert flower.node_config == f"/etc/fedseg/{SITE}/node.toml"
    assert flower.insecure is False


def test_runtime_api_stays_on_loopback_and_isolation_is_left_to_fedseg_supernode(argv):
    assert "--host" not in argv  # Flower's default: 127.0.0.1
    assert _parse_args_run_supernode().parse_args([]).host == "127.0.0.1"
    # fedseg-supernode adds --isolation process itself and refuses any other isolation.
    assert "--isolation" not in argv


def test_env_example_sets_every_variable_exec_start_uses(service, unit_environment):
    (command,) = service["ExecStart"]
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", command))
    defined = set(read_env_file(ENV_EXAMPLE)) | set(unit_environment)

    assert used == {"FEDSEG_SUPERLINK", "FEDSEG_RUNTIME_PORT", "FEDSEG_EXTRA_ARGS"}
    assert used - defined == set()


def test_flower_environment_keeps_state_in_the_site_dir_and_calls_no_one(unit_environment):
    assert unit_environment == {"FLWR_HOME": "/var/lib/fedseg/%i/flwr-home",
                                "FLWR_TELEMETRY_ENABLED": "0",
                                "FLWR_DISABLE_UPDATE_CHECK": "1"}


def test_hardening_lets_the_service_write_only_its_state_directory(service):
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/fedseg/%i", "UMask": "0077"}

    assert {key: service.get(key) for key in expected} == \
        {key: [value] for key, value in expected.items()}
    assert service["WorkingDirectory"] == ["/var/lib/fedseg/%i"]


def test_node_config_example_has_the_site_keys_as_toml_strings():
    node = tomllib.loads(NODE_EXAMPLE.read_text(encoding="utf-8"))

    assert set(FEDSEG_KEYS) <= set(node)
    assert all(isinstance(node[key], str) and node[key] for key in FEDSEG_KEYS)
    assert node["fedseg-site-name"] == SITE


def test_flower_reads_the_node_config_example_as_the_same_flat_keys(tmp_path):
    path = tmp_path / "node.toml"
    shutil.copy(NODE_EXAMPLE, path)

    assert parse_config_args([str(path)]) == tomllib.loads(path.read_text(encoding="utf-8"))


def test_node_config_example_site_dir_is_one_the_service_may_write(service):
    node = tomllib.loads(NODE_EXAMPLE.read_text(encoding="utf-8"))
    (writable,) = service["ReadWritePaths"]
    site_dir = PurePosixPath(node["fedseg-site-dir"])

    assert site_dir.is_absolute()
    assert site_dir.is_relative_to(writable.replace("%i", node["fedseg-site-name"]))


# systemd-analyze is not on every machine that runs this suite; where it is, the unit must
# pass `systemd-analyze verify` without a single warning (unknown keys and bad values are only
# warnings there, with exit status 0).
if shutil.which("systemd-analyze") is not None:

    def test_systemd_analyze_verifies_the_unit_without_warnings(tmp_path):
        local = Path(sys.executable).parent / "fedseg-supernode"
        assert local.is_file(), f"{local} missing: install the project (make)"
        text = UNIT.read_text(encoding="utf-8")
        (program,) = re.findall(r"^ExecStart=(\S+)", text, flags=re.M)
        # verify checks that the program exists: point it at this checkout's fedseg-supernode
        copy = tmp_path / UNIT.name
        copy.write_text(text.replace(program, str(local)), encoding="utf-8")

        done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                              text=True, timeout=60, check=False)

        assert (done.returncode, done.stdout + done.stderr) == (0, "")
