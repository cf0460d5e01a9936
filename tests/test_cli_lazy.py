"""``svcard`` imports a command's modules only when that command runs (issue 16 leftovers: CI
starts ``svcard`` hundreds of times): ``svcard serve payment`` loads the payment system's
command line, not the goods, trade or wallet systems'; ``svcard --version`` loads none; and
the payment and load command lines load no SQLAlchemy before their server starts.

Each case runs in a child forked from one process that has imported only the root group, and
reports the ``svcard`` modules the command loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import pytest

from svcard.host.cli import main as root
from svcard.host.cli.main import (
    OWN,
    SYSTEMS,
    LazyCommands,
    LazyGroup,
    exit_for,
    input_errors,
    main,
    registered,
)
from svcard.host.kit.command_line import EXIT_INPUT

# every system's command line module, by its name in sys.modules
SYSTEM_MODULES = {f"svcard.host.{m.removeprefix('..')}" for m in SYSTEMS} | {
    "svcard.host.helper.cli"}

CHILD = textwrap.dedent("""
    import json, os, sys
    from svcard.host.cli.main import main
    out = {}
    for argv in json.loads(sys.argv[1]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            code = main(argv, prog_name="svcard", standalone_mode=False)
            mods = sorted(m for m in sys.modules
                          if m.startswith("svcard.") or m in ("sqlalchemy", "httpx"))
            with os.fdopen(w, "w") as pipe:
                json.dump({"code": code, "modules": mods}, pipe)
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        out[" ".join(argv)] = json.loads(text) if text else {"status": status}
    print(json.dumps(out))
""")


def loaded_by(*argvs: list[str]) -> dict[str, set[str]]:
    """The ``svcard.*`` modules each ``svcard ARGV`` had loaded by its end."""
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argvs)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    for argv, what in found.items():
        assert what.get("code") == 0, (argv, what)
    return {argv: set(what["modules"]) for argv, what in found.items()}


def test_version_and_the_import_of_the_root_load_no_command() -> None:
    loaded = loaded_by(["--version"])["--version"]
    assert not loaded & SYSTEM_MODULES, sorted(loaded & SYSTEM_MODULES)
    assert "svcard.card.personalise" not in loaded
    assert not {m for m in loaded if m.startswith("svcard.host.cli.")} - {
        "svcard.host.cli.main"}


SERVE_CASES = {  # a server -> the one system command line module it may load
    "payment": "svcard.host.pay.cli", "bank": "svcard.host.load.cli",
    "goods-payment": "svcard.host.goods.cli", "wallet-fin": "svcard.host.wallet.cli"}
ROOT_CASES = {"pay": "svcard.host.pay.cli", "session": "svcard.host.trade.cli", "demo": None}


def test_each_command_loads_only_its_own_system() -> None:
    argvs = [["serve", name, "--help"] for name in SERVE_CASES]
    argvs += [[name, "--help"] for name in ROOT_CASES]
    loaded = loaded_by(*argvs)
    expected = {f"serve {n} --help": m for n, m in SERVE_CASES.items()}
    expected |= {f"{n} --help": m for n, m in ROOT_CASES.items()}
    for argv, module in expected.items():
        systems = loaded[argv] & SYSTEM_MODULES
        assert systems == ({module} if module else set()), (argv, sorted(systems))
    # the database layer comes with a server's own modules, not with its command line (the
    # trade command line still imports it at its top, through trade.customer and trade.closing)
    for argv in ("serve payment --help", "serve bank --help", "serve goods-payment --help",
                 "pay --help", "demo --help"):
        assert "sqlalchemy" not in loaded[argv], argv


LIGHT_CASES = (["goods", "--help"], ["device", "--help"], ["load", "--help"], ["helper", "--help"])


def test_commands_that_only_catch_profile_errors_load_no_profile_reader() -> None:
    """``handled()`` (every card command's error mapping) catches ProfileError, which now lives
    in card.storage: the pay, load, demo, helper and goods command lines and the servers no
    longer load card.personalise (its pydantic models, ~15 ms at each start); the goods and
    device command lines load no SQLAlchemy and no httpx until a command needs them."""
    loaded = loaded_by(*LIGHT_CASES, ["pay", "--help"], ["demo", "--help"],
                       ["serve", "payment", "--help"], ["serve", "goods-payment", "--help"])
    for argv in ("pay --help", "load --help", "demo --help", "helper --help", "goods --help",
                 "device --help", "serve payment --help", "serve goods-payment --help"):
        assert "svcard.card.personalise" not in loaded[argv], argv
    for argv in ("goods --help", "device --help", "serve goods-payment --help"):
        assert not loaded[argv] & {"sqlalchemy", "httpx", "svcard.host.kit.http"}, (
            argv, sorted(loaded[argv] & {"sqlalchemy", "httpx", "svcard.host.kit.http"}))


def test_profile_error_is_one_class_wherever_it_is_imported_from() -> None:
    from svcard.card import storage
    from svcard.card.personalise import ProfileError
    from svcard.host.kit.command_line import EXIT_DEVICE
    from svcard.host.terminal.card_commands import handled

    assert ProfileError is storage.ProfileError and issubclass(ProfileError, ValueError)
    with pytest.raises(SystemExit) as caught, handled():
        raise ProfileError("card.toml: atr: bad")
    assert caught.value.code == EXIT_DEVICE


def test_the_table_names_what_each_system_registers() -> None:
    for module, (commands, servers) in SYSTEMS.items():
        root_commands, server_commands = registered(module)
        assert sorted(root_commands) == sorted(commands), module
        assert sorted(server_commands) == sorted(servers), module
        for name, command in {**root_commands, **server_commands}.items():
            assert command.name == name, (module, name)
    for name in OWN:
        assert main.get_command(click.Context(main), name) is not None, name


def test_names_are_listed_without_loading_and_loaded_once() -> None:
    calls: list[str] = []

    def loader(name: str) -> click.Command:
        calls.append(name)
        return click.Command(name, help=f"the {name} command")

    group = LazyGroup("g", lazy={n: (lambda n=n: loader(n)) for n in ("b", "a")})
    group.add_command(click.Command("c"))
    ctx = click.Context(group)
    assert group.list_commands(ctx) == ["a", "b", "c"] and calls == []
    assert "a" in group.commands and "zz" not in group.commands and calls == []
    assert group.get_command(ctx, "zz") is None
    first = group.get_command(ctx, "a")
    assert first is not None and first is group.get_command(ctx, "a") and calls == ["a"]
    assert group.commands["b"].name == "b" and calls == ["a", "b"]
    del group.commands["b"]
    assert group.list_commands(ctx) == ["a", "c"] and len(group.commands) == 2
    with pytest.raises(KeyError):
        del group.commands["b"]
    assert isinstance(group.commands, LazyCommands)


def test_unknown_commands_are_still_usage_errors() -> None:
    from click.testing import CliRunner

    for argv in (["nosuch"], ["serve", "nosuch"]):
        result = CliRunner().invoke(main, argv, prog_name="svcard")
        assert result.exit_code == 2 and "No such command" in result.output, result.output


def test_input_errors_of_loaded_modules_are_exit_3() -> None:
    from svcard.card.personalise import ProfileError
    from svcard.card.storage import ImageError
    from svcard.host.kit.config import ConfigError
    from svcard.host.kit.reader_pool import PoolError

    assert set(input_errors()) == {ConfigError, ProfileError, ImageError, PoolError}
    for exc in (ConfigError("a.toml: x"), ProfileError("p.toml: y"), ImageError("i.json: z"),
                PoolError("pool")):
        assert exit_for(exc)[1] == EXIT_INPUT, exc
    assert root.PACKAGE == "svcard"
