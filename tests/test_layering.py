"""The layers and the systems, checked on the source tree itself (no install needed).

- Inside the tree every import of ours is relative and names a module or package that exists on
  disk, so an editor or a static tool that reads the folders resolves it.
- ``protocols`` imports nothing of ours; ``card`` and ``reader`` import only ``protocols`` (and
  themselves).
- Under ``host/``: ``kit`` imports no other host package; ``terminal`` imports only ``kit``; every
  other package except the roots ``cli``, ``demo`` and ``helper`` is a *system*, which imports
  ``kit``, ``terminal`` and itself, and another system only through that system's ``records``
  module (its read interface) or its ``client`` module (what any client of it may do).
- ``pyproject.toml`` lists every package, so a built wheel holds them all.
- No module under ``host/`` is longer than 400 lines, no folder holds more than 12 modules.

The checker is also run on made-up imports that break each rule, so it is known to fail.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("protocols", "card", "reader", "host", "fixtures")
HOST_COMMON = ("kit", "terminal")
HOST_ROOTS = ("cli", "demo", "helper")
MAX_MODULE_LINES = 400
MAX_FOLDER_MODULES = 12


def module_name(path: Path) -> str:
    """``host/pay/client.py`` -> ``svcard.host.pay.client``; a package is its ``__init__``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["svcard", *parts])


def source_files() -> list[Path]:
    return sorted(p for top in TOP for p in (ROOT / top).rglob("*.py"))


def exists(module: str) -> bool:
    """Whether ``svcard.a.b`` is a module file or a package folder in the tree."""
    base = ROOT.joinpath(*module.split(".")[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, here: str) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, was it relative) of every import in ``path``, the module
    ``here``; lazy and ``TYPE_CHECKING`` imports included; ``from . import x`` yields the
    module ``x`` when it is one, else the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = here.split(".")
    if path.name != "__init__.py":
        package.pop()
    found: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or "", False))
                continue
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if exists(sub) else target, True))
    return found


def layer_of(module: str) -> tuple[str, str | None]:
    """The layer of ``svcard.<top>...`` and, under host, its package (``pay``, ``kit``...)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    sub = parts[2] if top == "host" and len(parts) > 2 else None
    return top, sub


def rule_broken(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (both ours), or None when it may."""
    top, sub = layer_of(importer)
    to_top, to_sub = layer_of(imported)
    allowed_tops = {"protocols": {"protocols"}, "card": {"protocols", "card"},
                    "reader": {"protocols", "reader"}, "fixtures": {"fixtures"}}
    if top in allowed_tops:
        if to_top not in allowed_tops[top]:
            return f"{top} may import only {', '.join(sorted(allowed_tops[top]))}"
        return None
    if top != "host":
        return f"unknown layer {top}"
    if to_top in ("protocols", "card", "reader", "fixtures"):
        return None
    if sub is None:                      # host/__init__.py
        return "the host package itself imports nothing of ours"
    if sub in HOST_ROOTS or to_sub == sub:
        return None
    if sub == "kit":
        return "kit imports no other host package"
    if sub == "terminal":
        return None if to_sub == "kit" else "terminal imports only kit"
    if to_sub in HOST_COMMON:
        return None
    if to_sub in HOST_ROOTS or to_sub is None:
        return f"a system does not import host.{to_sub or '(package)'}"
    if imported in (f"svcard.host.{to_sub}.records", f"svcard.host.{to_sub}.client"):
        return None
    return (f"system {sub} imports system {to_sub}'s internals (only {to_sub}.records and "
            f"{to_sub}.client are shared)")


def violations() -> list[str]:
    return [v for path in source_files() for v in file_violations(path, module_name(path))]


def file_violations(path: Path, here: str) -> list[str]:
    """What is wrong with the imports of ``path``, read as the module ``here``."""
    found = []
    for line, imported, relative in imports_of(path, here):
        ours = imported == "svcard" or imported.startswith("svcard.")
        if not ours:
            continue
        if not relative:
            found.append(f"{here}:{line}: absolute import of {imported}: make it relative")
            continue
        if not exists(imported):
            found.append(f"{here}:{line}: {imported} is not in the tree")
            continue
        why = rule_broken(here, imported)
        if why:
            found.append(f"{here}:{line}: imports {imported}: {why}")
    return found


def test_every_import_of_ours_is_relative_resolves_and_keeps_the_layers() -> None:
    assert violations() == []


@pytest.mark.parametrize(("importer", "imported"), [
    ("svcard.protocols.purse", "svcard.card.iep"),
    ("svcard.card.iep", "svcard.reader.base"),
    ("svcard.card.iep", "svcard.host.kit.db"),
    ("svcard.reader.vpcd", "svcard.card.runtime"),
    ("svcard.host.kit.db", "svcard.host.terminal.purse"),
    ("svcard.host.terminal.purse", "svcard.host.pay.client"),
    ("svcard.host.pay.client", "svcard.host.load.server.app"),
    ("svcard.host.settle.audit", "svcard.host.pay.client_terminal"),
    ("svcard.host.settle.audit", "svcard.host.pay.server.db"),
    ("svcard.host.load.client", "svcard.host.cli.main"),
    ("svcard.host.pay.stack", "svcard.host.demo.system"),
])
def test_the_checker_refuses_each_kind_of_bad_import(importer: str, imported: str) -> None:
    assert rule_broken(importer, imported) is not None


@pytest.mark.parametrize(("importer", "imported"), [
    ("svcard.card.iep", "svcard.protocols.purse"),
    ("svcard.host.terminal.purse", "svcard.host.kit.db"),
    ("svcard.host.pay.server.app", "svcard.host.pay.server.db"),
    ("svcard.host.pay.client", "svcard.host.terminal.journal"),
    ("svcard.host.settle.audit", "svcard.host.pay.records"),
    ("svcard.host.pay.client", "svcard.host.load.client"),
    ("svcard.host.cli.main", "svcard.host.load.cli"),
    ("svcard.host.demo.system", "svcard.host.settle.clearing"),
])
def test_the_checker_allows_what_the_layers_allow(importer: str, imported: str) -> None:
    assert rule_broken(importer, imported) is None


def test_an_absolute_missing_or_layer_breaking_import_is_reported(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"     # read as if it were host/kit/probe.py
    probe.write_text("from svcard.host.kit import db\nfrom .no_such_module import x\n"
                     "def later() -> None:\n    from ..pay import client\n")
    found = file_violations(probe, "svcard.host.kit.probe")
    assert len(found) == 3, found
    assert "make it relative" in found[0] and "not in the tree" in found[1]
    assert "kit imports no other host package" in found[2]


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {module_name(p) for p in source_files() if p.name == "__init__.py"}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - on_disk == set(), "these packages are listed but not on disk"


def test_host_modules_and_folders_stay_small() -> None:
    too_long = {str(p.relative_to(ROOT)): n for p in (ROOT / "host").rglob("*.py")
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}
    crowded = {str(d.relative_to(ROOT)): n for d in [ROOT / "host", *(ROOT / "host").rglob("*")]
               if d.is_dir() and (n := len(list(d.glob("*.py")))) > MAX_FOLDER_MODULES}
    assert crowded == {}
