"""Settings: flags > HOMENET_* environment > TOML file > defaults, validated once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from homenet.node.settings import Settings, SettingsError, load_settings

WriteToml = Callable[..., str]


@pytest.fixture
def toml(tmp_path: Path) -> WriteToml:
    """Write a TOML config file and return its path as a string."""

    def write(text: str, name: str = "homenet.toml") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, config: str | None = None) -> Settings:
    return load_settings(flags, env=env if env is not None else {}, config=config)


def error(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, config: str | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load(flags, env, config)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# -- sources and precedence ----------------------------------------------------------------


def test_defaults() -> None:
    s = load()
    assert (s.bind, s.port, s.rl, s.listen_id, s.allow, s.mdns) == ("0.0.0.0", 6969, (), None, (), True)
    assert (s.log_level, s.log_format) == ("info", "text")
    assert (s.handshake_timeout, s.dial_timeout, s.idle_timeout, s.drain_grace) == (5.0, 10.0, 3600.0, 10.0)
    assert s.name


def test_top_level_keys(toml: WriteToml) -> None:
    path = toml('port = 7000\nbind = "127.0.0.1"\nallow = ["10.0.0.0/8"]\nmdns = false\nname = "home"\n')
    s = load(config=path)
    assert (s.port, s.bind, s.allow, s.mdns, s.name) == (7000, "127.0.0.1", ("10.0.0.0/8",), False, "home")


def test_node_table(toml: WriteToml) -> None:
    path = toml('[node]\nport = 7001\nlog-level = "debug"\nidle_timeout = 5\n')
    s = load(config=path)
    assert (s.port, s.log_level) == (7001, "debug")
    assert s.idle_timeout == 5.0
    assert isinstance(s.idle_timeout, float)


def test_precedence_flags_over_env_over_file(toml: WriteToml) -> None:
    path = toml('port = 1000\nname = "file"\nlog_level = "error"\n')
    env = {"HOMENET_PORT": "2000", "HOMENET_NAME": "env"}
    assert load(config=path).port == 1000
    s = load(env=env, config=path)
    assert (s.port, s.name, s.log_level) == (2000, "env", "error")
    s = load({"port": 3000}, env=env, config=path)
    assert (s.port, s.name, s.log_level) == (3000, "env", "error")


def test_flags_with_none_are_ignored(toml: WriteToml) -> None:
    path = toml("port = 1000\n")
    s = load({"port": None, "name": None, "bind": "127.0.0.2"}, env={"HOMENET_NAME": "env"}, config=path)
    assert (s.port, s.name, s.bind) == (1000, "env", "127.0.0.2")


def test_config_path_from_env(toml: WriteToml) -> None:
    a = toml("port = 1111\n", "a.toml")
    b = toml("port = 2222\n", "b.toml")
    assert load(env={"HOMENET_CONFIG": a}).port == 1111
    assert load(env={"HOMENET_CONFIG": a}, config=b).port == 2222


def test_env_values_are_converted() -> None:
    s = load(
        env={
            "HOMENET_PORT": "7002",
            "HOMENET_MDNS": "off",
            "HOMENET_IDLE_TIMEOUT": "0",
            "HOMENET_DIAL_TIMEOUT": "2.5",
            "HOMENET_MAX_SESSIONS": "10",
            "HOMENET_LISTEN_ID": "home_1",
            "UNRELATED": "x",
        }
    )
    assert (s.port, s.mdns, s.idle_timeout, s.dial_timeout, s.max_sessions) == (7002, False, 0.0, 2.5, 10)
    assert s.listen_id == "home_1"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.0/8,192.168.1.0/24 lan", ("10.0.0.0/8", "192.168.1.0/24", "lan")),
        ("a,b c", ("a", "b", "c")),
        (" a ,, b  ", ("a", "b")),
        ("single", ("single",)),
        ("", ()),
    ],
)
def test_list_values_from_env(text: str, want: tuple[str, ...]) -> None:
    assert load(env={"HOMENET_MDNS_TYPES": text}).mdns_types == want


def test_allow_rules_are_checked_when_the_settings_are_built() -> None:
    assert load(env={"HOMENET_ALLOW": "10.0.0.0/8,192.168.1.0/24 lan"}).allow == ("10.0.0.0/8", "192.168.1.0/24", "lan")
    with pytest.raises(
        SettingsError, match=r"^HOMENET_ALLOW: allow 'b': expected a CIDR like 192.168.1.0/24, or 'lan'$"
    ):
        load(env={"HOMENET_ALLOW": "10.0.0.0/8,b"})


def test_rl_list_from_env() -> None:
    s = load(env={"HOMENET_RL": "hn://relay-a/x, hn://[::1]:7000"})
    assert s.rl == ("hn://relay-a/x", "hn://[::1]:7000")


def test_list_as_string_in_toml(toml: WriteToml) -> None:
    assert load(config=toml('allow = "10.0.0.0/8, lan"\n')).allow == ("10.0.0.0/8", "lan")


@pytest.mark.parametrize(
    ("text", "want"),
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("False", False), ("no", False)],
)
def test_bools_from_env(text: str, want: bool) -> None:
    assert load(env={"HOMENET_MDNS": text}).mdns is want


def test_env_beats_a_file_named_by_env(toml: WriteToml) -> None:
    path = toml("mdns = true\n")
    assert load(env={"HOMENET_CONFIG": path, "HOMENET_MDNS": "0"}).mdns is False


# -- errors name their source -----------------------------------------------------------------


def test_unknown_key_in_file(toml: WriteToml) -> None:
    path = toml("port = 1\ncolour = 'blue'\n")
    msg = error(config=path)
    assert path in msg
    assert "unknown setting 'colour'" in msg


def test_unknown_key_in_node_table(toml: WriteToml) -> None:
    path = toml("[node]\nprot = 1\n")
    assert "unknown setting 'prot'" in error(config=path)


def test_unknown_top_level_table_without_node(toml: WriteToml) -> None:
    assert "unknown setting 'logging'" in error(config=toml("[logging]\nlevel = 'debug'\n"))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('port = "x"', "port: invalid literal"),
        ("port = true", "wrong type bool for port"),
        ("port = 1.5", "wrong type float for port"),
        ('mdns = "maybe"', "expected true or false, got 'maybe'"),
        ("mdns = 1", "wrong type int for mdns"),
        ("allow = [1, 2]", "wrong type list for allow"),
        ("allow = 5", "wrong type int for allow"),
        ("idle_timeout = true", "wrong type bool for idle_timeout"),
        ('idle_timeout = "soon"', "could not convert"),
        ("name = 5", "wrong type int for name"),
        ("listen_id = 5", "wrong type int for listen_id"),
        ("bind = ['a']", "wrong type list for bind"),
    ],
)
def test_bad_types_in_file(toml: WriteToml, body: str, fragment: str) -> None:
    path = toml(body + "\n")
    msg = error(config=path)
    assert msg.startswith(f"config {path}: ")
    assert fragment in msg


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("HOMENET_PORT", "x", "invalid literal"),
        ("HOMENET_PORT", "1.5", "invalid literal"),
        ("HOMENET_MDNS", "maybe", "expected true or false"),
        ("HOMENET_IDLE_TIMEOUT", "soon", "could not convert"),
        ("HOMENET_MAX_SESSIONS", "many", "invalid literal"),
    ],
)
def test_bad_values_in_env(var: str, value: str, fragment: str) -> None:
    msg = error(env={var: value})
    assert msg.startswith(f"{var}: ")
    assert fragment in msg


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    assert error(config=path) == f"cannot read config {path}: No such file or directory"


def test_config_is_a_directory(tmp_path: Path) -> None:
    assert error(config=str(tmp_path)) == f"cannot read config {tmp_path}: Is a directory"


def test_invalid_toml(toml: WriteToml) -> None:
    path = toml("port = = 1\n[[\n")
    msg = error(config=path)
    assert msg.startswith(f"config {path} is not valid TOML: ")
    assert "line 1" in msg


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"port": 65536}, "port 65536 out of range"),
        ({"port": -1}, "port -1 out of range"),
        ({"bind": "not a host!"}, "bind 'not a host!'"),
        ({"bind": ""}, "bind ''"),
        ({"rl": ("hn://relay//x",)}, "rl: bad URL"),
        ({"rl": ("http://relay",)}, "rl: bad URL"),
        ({"log_level": "loud"}, "log_level 'loud'"),
        ({"log_format": "xml"}, "log_format 'xml'"),
        ({"handshake_timeout": 0}, "handshake_timeout must be > 0"),
        ({"dial_timeout": -1.0}, "dial_timeout must be > 0"),
        ({"drain_grace": 0.0}, "drain_grace must be > 0"),
        ({"idle_timeout": -0.5}, "idle_timeout must be >= 0"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_handshakes": 0}, "max_handshakes"),
        ({"listen_id": "bad id"}, "listen_id 'bad id'"),
        ({"listen_id": ""}, "listen_id ''"),
        ({"listen_id": "x" * 65}, "listen_id"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_values(flags: dict[str, Any], fragment: str) -> None:
    assert fragment in error(flags)


@pytest.mark.parametrize(
    "flags",
    [
        {"port": 0},
        {"port": 65535},
        {"bind": "::"},
        {"bind": "::1"},
        {"bind": "localhost"},
        {"idle_timeout": 0.0},
        {"listen_id": "x" * 64},
        {"rl": ("hn://relay/a", "hn://[::1]:7000")},
    ],
)
def test_good_edge_values(flags: dict[str, Any]) -> None:
    s = load(flags)
    for key, value in flags.items():
        assert getattr(s, key) == value


def test_settings_are_frozen_and_replace_validates() -> None:
    s = load({"port": 7000})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert s.replace(port=7001).port == 7001
    assert s.port == 7000
    with pytest.raises(SettingsError):
        s.replace(port=70000)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


# -- bugs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ['node = "x"', "node = 5", "node = [1]"])
def test_node_key_that_is_not_a_table(toml: WriteToml, body: str) -> None:
    path = toml(body + "\n")
    assert error(config=path) == f"config {path}: 'node' must be a table ([node])"


def test_top_level_keys_beside_node_table_are_refused(toml: WriteToml) -> None:
    path = toml('port = 1234\n[node]\nname = "x"\n')
    assert error(config=path) == f"config {path}: put every setting under [node], or none"


@pytest.mark.parametrize(
    ("env", "source"),
    [
        ({"HOMENET_PORT": "70000"}, "HOMENET_PORT: port 70000"),
        ({"HOMENET_LOG_LEVEL": "loud"}, "HOMENET_LOG_LEVEL: log_level 'loud'"),
        ({"HOMENET_IDLE_TIMEOUT": "-1"}, "HOMENET_IDLE_TIMEOUT: idle_timeout must be >= 0"),
        ({"HOMENET_BIND": "a b"}, "HOMENET_BIND: bind 'a b'"),
        ({"HOMENET_RL": "hn://x//y"}, "HOMENET_RL: rl: bad URL"),
        ({"HOMENET_LISTEN_ID": "a.b"}, "HOMENET_LISTEN_ID: listen_id 'a.b'"),
        ({"HOMENET_MAX_SESSIONS": "0"}, "HOMENET_MAX_SESSIONS: "),
    ],
)
def test_range_errors_name_the_env_var(env: dict[str, str], source: str) -> None:
    assert error(env=env).startswith(source)


def test_range_errors_name_the_file(toml: WriteToml) -> None:
    path = toml("port = 70000\n")
    assert error(config=path) == f"config {path}: port 70000 out of range 0-65535"


def test_range_errors_name_the_flag(toml: WriteToml) -> None:
    path = toml("port = 70000\n")  # overridden: the flag's value is the bad one
    assert error({"dial_timeout": 0.0}, env={"HOMENET_PORT": "1"}, config=path).startswith("--dial-timeout: ")


def test_the_winning_source_is_named(toml: WriteToml) -> None:
    path = toml("port = 1\n")
    assert error(env={"HOMENET_PORT": "70000"}, config=path).startswith("HOMENET_PORT: ")
    assert error({"port": 70000}, env={"HOMENET_PORT": "1"}, config=path).startswith("--port: ")


@pytest.mark.parametrize(
    "env",
    [{"HOMENET_MAX_HANDSHAKES": "0"}, {"HOMENET_MAX_HANDSHAKES": "0", "HOMENET_MAX_SESSIONS": "5"}],
    ids=["alone", "beside-a-good-max-sessions"],
)
def test_bad_max_handshakes_names_its_own_source(env: dict[str, str]) -> None:
    assert error(env=env).startswith("HOMENET_MAX_HANDSHAKES: ")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("var", ["HOMENET_HANDSHAKE_TIMEOUT", "HOMENET_DIAL_TIMEOUT", "HOMENET_IDLE_TIMEOUT"])
def test_non_finite_floats_are_refused(var: str, value: str) -> None:
    assert error(env={var: value}).startswith(f"{var}: ")


def test_an_empty_variable_of_an_optional_setting_means_unset() -> None:
    s = load_settings(env={"HOMENET_KEY": "", "HOMENET_TLS_CA": ""})
    assert (s.key, s.tls_ca) == (None, None)


def test_a_kubernetes_service_link_is_not_the_port() -> None:
    s = load_settings(env={"HOMENET_PORT": "tcp://10.96.0.7:6969", "HOMENET_SERVICE_PORT": "6969"})
    assert s.port == 6969
    assert load_settings(env={"HOMENET_PORT": "7000"}).port == 7000


@pytest.mark.parametrize(
    ("bind", "want", "open_access"),
    [
        ("127.0.0.1:9469", ("127.0.0.1", 9469), True),
        ("127.0.0.1:0", ("127.0.0.1", 0), True),
        ("[::1]:9469", ("::1", 9469), True),
        ("localhost:9469", ("localhost", 9469), True),
    ],
)
def test_metrics_bind_on_loopback_needs_no_key(bind: str, want: tuple[str, int], open_access: bool) -> None:
    s = Settings(metrics_bind=bind)
    assert (s.metrics_endpoint(), s.metrics_open) == (want, open_access)


def test_metrics_are_off_by_default() -> None:
    assert Settings().metrics_endpoint() is None


@pytest.mark.parametrize("bind", ["9469", "127.0.0.1:", "127.0.0.1:70000", "not an address:1", ":9469"])
def test_a_bad_metrics_bind_is_one_line(bind: str) -> None:
    with pytest.raises(SettingsError, match=r"^metrics_bind"):
        Settings(metrics_bind=bind)


def test_metrics_off_loopback_need_tls_for_the_admin_key_or_an_explicit_none() -> None:
    with pytest.raises(SettingsError, match="would cross the network in clear"):
        Settings(metrics_bind="0.0.0.0:9469")
    assert not Settings(metrics_bind="0.0.0.0:9469", tls_cert="c.pem", tls_key="k.pem").metrics_open
    assert Settings(metrics_bind="0.0.0.0:9469", metrics_auth="none").metrics_open
    with pytest.raises(SettingsError, match="metrics_auth 'maybe'"):
        Settings(metrics_bind="127.0.0.1:9469", metrics_auth="maybe")


def test_metrics_with_several_workers_are_served_by_worker_0() -> None:
    from homenet.control.workers import WorkerSpec, worker_settings

    s = Settings(metrics_bind="127.0.0.1:9469", workers=2)
    spec = WorkerSpec(0, ("127.0.0.1:1", "127.0.0.1:2"), ("/a", "/b"), "/k", "/r", 3, -1, "127.0.0.1", 1, 1)
    assert worker_settings(s, spec).metrics_bind == "127.0.0.1:9469"
    other = WorkerSpec(1, spec.siblings, spec.handoffs, "/k", "/r", 4, -1, "127.0.0.1", 1, 1)
    assert worker_settings(s, other).metrics_bind == ""
