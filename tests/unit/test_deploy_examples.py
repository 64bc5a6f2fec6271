"""deploy/systemd and deploy/config checked offline: each example config loads through the
node's own settings loader (what ``homenet node --config`` runs) into the node it promises (a
public relay, a home node); the unit's ExecStart goes through the real CLI parser and, with the
unit's environment and each example as its config file, gives those settings with the state
directory systemd provides; the unit keeps its hardening, its stop timeout outlasts the drain,
its open-files limit covers the sessions; and, where systemd's own tool is installed, systemd
accepts the unit without a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from homenet.cli.common import EXIT_USAGE
from homenet.cli.main import _given, _parser, main
from homenet.node.address import DEFAULT_PORT, parse_url
from homenet.node.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "homenet.service"
CONFIGS = ROOT / "deploy" / "config"
EXAMPLES = ("relay", "home")
#: What systemd puts for the specifiers the unit uses (system manager): %S state, %E config,
#: %d credentials.
SPECIFIERS = {"%S": "/var/lib", "%E": "/etc", "%d": "/run/credentials/homenet.service", "%%": "%"}
#: The supervisor of ``workers > 1`` waits this long past drain_grace for its workers
#: (homenet/control/workers.py) before it closes.
SUPERVISOR_EXTRA = 5.0
#: A commented-out setting in an example: ``# name = value``.
COMMENTED_SETTING = re.compile(r"^# ?([a-z_]+ = .+)$", re.M)
#: Settings that no example file may hold: the node's own secret (the file is world-readable).
SECRET_SETTINGS = ("key",)


@dataclass(frozen=True)
class Unit:
    """A unit file as systemd reads it: per section, every ``Key=value`` in order (a key may
    repeat: ``SystemCallFilter=`` twice adds both)."""

    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def read(cls, path: Path) -> Unit:
        sections: dict[str, list[tuple[str, str]]] = {}
        entries: list[tuple[str, str]] | None = None
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not logical and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):  # a continuation: systemd joins it with a space
                logical += line[:-1] + " "
                continue
            line, logical = logical + line, ""
            if line.startswith("[") and line.endswith("]"):
                entries = sections.setdefault(line[1:-1], [])
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not Key=value: {raw!r}"
            assert entries is not None, f"{path.name}: {raw!r} before any [Section]"
            entries.append((key.strip(), value.strip()))
        return cls(sections)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def one(self, key: str, section: str = "Service") -> str:
        found = self.values(key, section)
        assert len(found) == 1, f"[{section}] {key}= is set {len(found)} times, want once"
        return found[0]

    @property
    def environment(self) -> dict[str, str]:
        """``Environment=`` assignments, specifiers expanded."""
        out: dict[str, str] = {}
        for value in self.values("Environment"):
            for word in shlex.split(value):
                name, sep, val = word.partition("=")
                assert sep, f"Environment={value}: {word!r} is not NAME=VALUE"
                out[name] = expand(val)
        return out

    @property
    def exec_start(self) -> list[str]:
        argv = shlex.split(self.one("ExecStart"))
        assert argv[0].startswith("/"), "ExecStart names its binary by an absolute path (no - @ + ! prefix)"
        return argv


def expand(value: str) -> str:
    """The unit's specifiers, as the system manager resolves them."""
    unknown = set(re.findall(r"%.", value)) - set(SPECIFIERS)
    assert not unknown, f"{value}: specifiers this test does not know: {sorted(unknown)}"
    return re.sub(r"%.", lambda m: SPECIFIERS[m[0]], value)


def seconds(span: str) -> float:
    """A systemd time span (``30``, ``30s``, ``1min 30s``) in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, f"time span {span!r}"
    assert "".join(n + u for n, u in parts) == span.replace(" ", ""), f"time span {span!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def unit() -> Unit:
    return Unit.read(UNIT)


def node_args(unit: Unit) -> argparse.Namespace:
    """The unit's ExecStart, minus the binary, parsed by the real ``homenet`` parser."""
    argv = unit.exec_start[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"homenet refuses the unit's ExecStart {argv}: {err.getvalue().strip()}", pytrace=False)


def example(name: str) -> Path:
    return CONFIGS / f"{name}.toml"


def load_example(name: str) -> Settings:
    """An example alone (no flags, no environment), as ``homenet node --config FILE`` loads it."""
    return load_settings({}, env={}, config=str(example(name)))


def as_installed(unit: Unit, name: str) -> Settings:
    """What the service runs with when the example is installed as its config file: the
    ExecStart's flags, the unit's environment, the file."""
    return load_settings(_given(node_args(unit)), env=unit.environment, config=str(example(name)))


# -- the example configs --------------------------------------------------------------------------


def test_the_relay_example_is_a_public_relay() -> None:
    s = load_example("relay")
    assert (s.bind, s.port) == ("0.0.0.0", DEFAULT_PORT)
    assert s.mdns is False, "no mDNS on a public VM"
    assert s.allow == (), "a relay reaches only what registers with it"
    assert s.rl == ()
    assert (s.rl_auth, s.connect_auth, s.query_auth) == ("required", "direct", "required")
    assert s.tls_cert is None, "TLS is commented out: it needs the operator's certificate"
    assert s.tls_key is None
    defaults = Settings(name="x")
    for limit in ("max_sessions", "max_listener_sessions", "max_handshakes", "max_per_source", "penalty_threshold"):
        assert 1 <= getattr(s, limit) <= getattr(defaults, limit), f"{limit} looser than the default"
    assert 0 < s.handshake_timeout <= defaults.handshake_timeout
    assert s.idle_timeout > 0, "an idle session is closed in the end"
    assert s.name == "relay1"


def test_the_home_example_listens_on_a_relay_and_bridges_the_lan() -> None:
    s = load_example("home")
    assert s.rl == ("hn://relay.example.net",)
    route = parse_url(s.rl[0])
    assert (route.entry.host, route.entry.port, route.hops) == ("relay.example.net", DEFAULT_PORT, ())
    assert s.listen_id == "home1"
    assert s.allow == ("lan",), "the home LAN, expanded from the interfaces when the node starts"
    assert s.mdns is True
    assert s.mdns_interface == (), "mDNS on every interface unless the operator narrows it"
    assert s.name == "home1"
    assert (s.connect_auth, s.query_auth) == ("direct", "required")


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_setting_sits_under_node_and_no_secret(name: str) -> None:
    table = tomllib.loads(example(name).read_text())
    assert list(table) == ["node"], "one [node] table, as in deploy/k8s"
    known = {f.name for f in fields(Settings)}
    assert set(table["node"]) <= known
    for secret in SECRET_SETTINGS:
        assert secret not in table["node"], f"{secret}: the config file is readable by the service, keep secrets out"


@pytest.mark.parametrize("name", EXAMPLES)
def test_commented_out_settings_are_real_and_load(name: str, tmp_path: Path) -> None:
    text = example(name).read_text()
    commented = COMMENTED_SETTING.findall(text)
    assert commented, f"{name}.toml shows optional settings as '# name = value' lines"
    live = tomllib.loads(text)["node"]
    for line in commented:
        assert line.split(" = ", 1)[0] not in live, f"{line!r} repeats a live setting"
    config = tmp_path / f"{name}.toml"
    config.write_text(COMMENTED_SETTING.sub(r"\1", text))
    try:
        load_settings({}, env={}, config=str(config))
    except SettingsError as exc:
        pytest.fail(f"{name}.toml with its commented settings turned on: {exc}", pytrace=False)


def test_the_relay_tls_lines_use_the_units_credentials(unit: Unit, tmp_path: Path) -> None:
    text = example("relay").read_text()
    config = tmp_path / "relay.toml"
    config.write_text(COMMENTED_SETTING.sub(lambda m: m[1] if m[1].startswith("tls_") else m[0], text))
    s = load_settings({}, env={}, config=str(config))
    assert s.tls_cert is not None
    assert s.tls_key is not None
    # the unit's commented LoadCredential= lines name the files the config reads
    credentials = dict(
        m[1].split(":", 1) for m in re.finditer(r"^#\s*LoadCredential=(.+)$", UNIT.read_text(), re.M)
    )  # fmt: skip
    for path in (s.tls_cert, s.tls_key):
        folder, _, file = path.rpartition("/")
        assert folder == expand("%d"), f"{path}: not in the service's credentials directory"
        assert file in credentials, f"{path}: the unit loads no credential {file}"


# -- the unit's command line and environment -----------------------------------------------------


def test_the_unit_runs_homenet_node_with_its_config_directory_file(unit: Unit) -> None:
    argv = unit.exec_start
    assert Path(argv[0]).name == "homenet"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["homenet"] == "homenet.cli.main:main", "the binary is the homenet console script"
    ns = node_args(unit)
    assert ns.command == "node"
    assert ns.config == f"/etc/{unit.one('ConfigurationDirectory')}/homenet.toml"
    assert {k: v for k, v in _given(ns).items() if v is not None} == {}, "every setting comes from the file"


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_unit_runs_each_example_with_systemds_state_dir(unit: Unit, name: str) -> None:
    try:
        s = as_installed(unit, name)
    except SettingsError as exc:
        pytest.fail(f"homenet node refuses the unit with {name}.toml: {exc}", pytrace=False)
    state = f"/var/lib/{unit.one('StateDirectory')}"
    assert s.state_dir == state, "the node keeps its state where systemd made StateDirectory="
    assert s.keys_path == Path(state) / "keys.toml"
    alone = load_example(name)
    assert s.replace(state_dir=alone.state_dir) == alone, "the unit changes nothing but the state dir"


def test_the_unit_environment_names_real_settings(unit: Unit) -> None:
    known = {f"HOMENET_{f.name.upper()}" for f in fields(Settings)}
    env = unit.environment
    assert set(env) <= known, f"unknown variables: {sorted(set(env) - known)}"
    assert env["HOMENET_STATE_DIR"] == f"/var/lib/{unit.one('StateDirectory')}"
    env_file = unit.one("EnvironmentFile")
    assert env_file.startswith("-"), "the environment file is optional"
    assert Path(env_file[1:]).parent == Path("/etc") / unit.one("ConfigurationDirectory")


def test_a_bad_config_exits_with_the_status_the_unit_does_not_restart(unit: Unit, tmp_path: Path) -> None:
    assert str(EXIT_USAGE) in unit.one("RestartPreventExitStatus").split()
    bad = tmp_path / "homenet.toml"
    bad.write_text("[node]\nprot = 6969\n")
    argv = [*unit.exec_start[1:]]
    argv[argv.index("--config") + 1] = str(bad)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "unknown setting 'prot'" in err.getvalue()


# -- hardening and lifecycle ---------------------------------------------------------------------

HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "UMask": "0077",
    "StateDirectory": "homenet",
    "ConfigurationDirectory": "homenet",
}


def test_the_unit_is_hardened(unit: Unit) -> None:
    for key, want in HARDENING.items():
        assert unit.one(key) == want, f"{key}={unit.one(key)}, want {key}={want}"
    assert set(unit.one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert unit.values("SystemCallFilter")[0] == "@system-service", "an allow list first"
    assert not unit.values("User"), "DynamicUser= picks the user"
    assert not unit.values("Group"), "DynamicUser= picks the group"
    assert not unit.values("ReadWritePaths"), "nothing writable but StateDirectory="
    assert not any(v.startswith(("+", "!")) for k, v in unit.sections["Service"] if k.startswith("Exec")), (
        "no command runs with full privileges"
    )


def test_the_unit_starts_and_stops_the_node_the_way_it_runs(unit: Unit) -> None:
    assert unit.one("Type") == "exec", "the node does not speak sd_notify"
    assert unit.one("Restart") == "on-failure"
    assert unit.one("KillSignal") == "SIGTERM", "SIGTERM drains"
    assert unit.one("KillMode") == "mixed", "a second SIGTERM to a worker would cut its drain short"
    assert "network-online.target" in unit.one("After", "Unit").split()
    assert unit.one("WantedBy", "Install") == "multi-user.target"


def test_the_stop_timeout_outlasts_the_drain(unit: Unit) -> None:
    timeout = seconds(unit.one("TimeoutStopSec"))
    for s in (Settings(name="x"), *(as_installed(unit, n) for n in EXAMPLES)):
        assert timeout > s.drain_grace + SUPERVISOR_EXTRA, (
            f"TimeoutStopSec {timeout} <= drain_grace {s.drain_grace} + {SUPERVISOR_EXTRA}: systemd would "
            "SIGKILL sessions the node is still draining"
        )


def test_open_files_cover_the_sessions(unit: Unit) -> None:
    limit = int(unit.one("LimitNOFILE"))
    for s in (Settings(name="x"), *(as_installed(unit, n) for n in EXAMPLES)):
        need = 2 * s.max_sessions + s.max_handshakes
        assert limit > need, f"LimitNOFILE {limit}: {s.max_sessions} sessions hold two sockets each"


# -- systemd's own checks ---------------------------------------------------------------------------


def _homenet_script() -> Path:
    """The ``homenet`` console script installed next to this Python (what ExecStart runs)."""
    for candidate in (Path(sys.executable).parent / "homenet", shutil.which("homenet")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"no homenet script next to {sys.executable}: install HomeNet (pip install -e .)", pytrace=False)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (no systemd package on this machine); "
    "the unit's directives are still checked by the tests above",
)
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    # verify checks that ExecStart's binary exists: point it at this checkout's script
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/homenet ", f"ExecStart={_homenet_script()} ", 1)
    assert text != UNIT.read_text()
    installed = tmp_path / UNIT.name
    installed.write_text(text)
    proc = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in proc.stderr.splitlines() if UNIT.name in line]
    assert proc.returncode == 0, f"systemd-analyze verify: {proc.stderr.strip()}"
    assert not ours, f"systemd-analyze verify warns: {proc.stderr.strip()}"
    # exposure on systemd's 0-10 scale, in tenths: 2.0 is "OK", the best band
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(installed)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    exposure = re.search(r"Overall exposure level for \S+: (\S+)", proc.stdout)
    assert proc.returncode == 0, f"systemd-analyze security: exposure {exposure and exposure[1]} > 2.0"
