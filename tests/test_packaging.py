"""Packaging (issue 10, point 9): what the source distribution and the wheel hold, the metadata
(an SPDX licence with its file, classifiers, project URLs), one version from one place, the
``py.typed`` mark on every package (checked by mypy --strict as a user of the installed wheel
would run it), and the pure parts importing on a system without ``fcntl``.

The sdist is built from a copy of the work tree, and the wheel from that sdist, as pip does, by
setuptools' own build backend (no network: the venv's setuptools, which the dev extra pins).
"""

from __future__ import annotations

import email
import email.message
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from svcard.host.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
# what a copy of the work tree leaves out: caches, the venv, local databases, builds
SKIPPED = (".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache",
           ".pytest_cache", ".hypothesis", "*.egg-info", "*.lock", "*.db", "*.db-*", "out")
BUILD = ("import sys\nfrom setuptools import build_meta\n"
         "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))")
SETUPTOOLS_NEEDED = (77, 0)  # the SPDX `license` string and `license-files`


def folder_of(package: str) -> Path:
    """The source folder of an ``svcard.*`` package, through pyproject's ``package-dir``."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = PACKAGE_DIRS.get(".".join(parts[:cut]))
        if mapped is not None:
            return ROOT.joinpath(mapped, *parts[cut:])
    raise AssertionError(f"{package} is under no package-dir entry")


def wheel_path(package: str) -> str:
    return "/".join(package.split("."))


@dataclass
class Dists:
    tree: Path                # the copy of the work tree the sdist was built from
    sdist: Path
    sdist_names: set[str]     # member names with the leading "svcard-VERSION/" cut off
    sdist_base: str
    wheel: Path
    wheel_names: set[str]
    dist_info: str


def _copy_tree(target: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in SKIPPED)}

    shutil.copytree(ROOT, target, symlinks=True, ignore=ignore)


def _build(hook: str, source: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=source,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{hook} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # a data folder taken for a package, or a package left out, is a warning, not an error
    assert "would be ignored" not in done.stderr, done.stderr[-3000:]
    name = done.stdout.strip().splitlines()[-1]
    return out / name


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    have = tuple(int(p) for p in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    assert have >= SETUPTOOLS_NEEDED, (
        f"setuptools {metadata.version('setuptools')} cannot build svcard: it needs "
        f">= {'.'.join(map(str, SETUPTOOLS_NEEDED))} (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("packaging")
    _copy_tree(work / "tree")
    (work / "out").mkdir()
    sdist = _build("build_sdist", work / "tree", work / "out")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
        tar.extractall(work / "unpacked", filter="data")
    base = members[0].split("/", 1)[0]
    wheel = _build("build_wheel", work / "unpacked" / base, work / "out")
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = set(archive.namelist())
    dist_info = next(n.split("/", 1)[0] for n in wheel_names if ".dist-info/" in n)
    inside = {m.split("/", 1)[1] for m in members if "/" in m}
    return Dists(work / "tree", sdist, inside, base, wheel, wheel_names, dist_info)


def sdist_member(dists: Dists, name: str) -> bytes:
    with tarfile.open(dists.sdist) as tar:
        found = tar.extractfile(f"{dists.sdist_base}/{name}")
        assert found is not None, name
        return found.read()


def wheel_metadata(dists: Dists) -> email.message.Message:
    with zipfile.ZipFile(dists.wheel) as archive:
        return email.message_from_bytes(archive.read(f"{dists.dist_info}/METADATA"))


def test_license_file_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text   # the whole text, not a pointer to it
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_license_in_sdist_and_wheel(dists: Dists) -> None:
    license_bytes = (ROOT / "LICENSE").read_bytes()
    assert sdist_member(dists, "LICENSE") == license_bytes
    pkg_info = email.message_from_bytes(sdist_member(dists, "PKG-INFO"))
    assert pkg_info["License-Expression"] == "Apache-2.0"
    assert pkg_info.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(dists.wheel) as archive:
        assert archive.read(f"{dists.dist_info}/licenses/LICENSE") == license_bytes
    meta = wheel_metadata(dists)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]


def test_wheel_metadata_has_classifiers_and_urls(dists: Dists) -> None:
    meta = wheel_metadata(dists)
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX field says it
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    home = "https://github.com/svcard/svcard"
    assert urls == {"Homepage": home, "Source": home, "Issues": f"{home}/issues",
                    "Documentation": f"{home}/tree/main/docs"}


def test_every_package_folder_is_marked_typed() -> None:
    folders = {p.parent for d in set(PACKAGE_DIRS.values()) for p in (ROOT / d).rglob("*.py")
               if "__pycache__" not in p.parts}
    unmarked = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "py.typed").is_file())
    assert not unmarked, f"no py.typed in {unmarked}"


def test_wheel_marks_every_package_typed(dists: Dists) -> None:
    missing = [p for p in PACKAGES if f"{wheel_path(p)}/py.typed" not in dists.wheel_names]
    assert not missing, f"no py.typed in the wheel for {missing}"


def test_wheel_holds_the_runtime_data_and_no_tests(dists: Dists) -> None:
    names = dists.wheel_names
    for document in ("payment", "merchant", "load", "bank"):  # served as /openapi.json
        assert f"svcard/host/openapi/{document}.yaml" in names
    for profile in (ROOT / "fixtures").glob("*.toml"):
        assert f"svcard/fixtures/{profile.name}" in names
    outside = sorted(n for n in names
                     if not n.startswith(("svcard/", f"{dists.dist_info}/")))
    assert not outside, outside
    tests = sorted(n for n in names if "tests/" in n or re.search(r"(^|/)test_[^/]*\.py$", n)
                   or "conftest" in n)
    assert not tests, tests
    for package in PACKAGES:  # every module of every package, and nothing of the tree else
        for module in folder_of(package).glob("*.py"):
            assert f"{wheel_path(package)}/{module.name}" in names, module


def test_sdist_holds_docs_tests_and_their_data(dists: Dists) -> None:
    names, tree = dists.sdist_names, dists.tree
    wanted = ["README.md", "LICENSE", "pyproject.toml", "MANIFEST.in"]
    wanted += [str(p.relative_to(tree)) for p in (tree / "docs").glob("*.md")]
    wanted += [f"docs/openapi/{p.name}" for p in (tree / "host" / "openapi").glob("*.yaml")]
    wanted += [f"host/openapi/{p.name}" for p in (tree / "host" / "openapi").glob("*.yaml")]
    wanted += [str(p.relative_to(tree)) for p in (tree / "tests").rglob("*") if p.is_file()]
    wanted += [str(p.relative_to(tree)) for p in (tree / "fixtures").glob("*.toml")]
    assert len([n for n in wanted if n.startswith("tests/test_")]) > 10, wanted
    missing = sorted(n for n in wanted if n not in names)
    assert not missing, f"not in the sdist: {missing}"
    assert sdist_member(dists, "docs/openapi/payment.yaml") == \
        (ROOT / "host" / "openapi" / "payment.yaml").read_bytes()
    junk = sorted(n for n in names if re.search(
        r"(^|/)(\.git|\.venv|__pycache__|\.mypy_cache|\.hypothesis)(/|$)|\.pyc$|\.db$|\.lock$",
        n))
    assert not junk, junk


def test_version_comes_from_one_place(dists: Dists) -> None:
    version = PYPROJECT["project"]["version"]
    assert "version" not in PYPROJECT["project"].get("dynamic", [])
    assert wheel_metadata(dists)["Version"] == version
    assert dists.sdist_base == f"svcard-{version}"
    result = CliRunner().invoke(main, ["--version"], prog_name="svcard")
    assert result.exit_code == 0, result.output
    assert result.output == f"svcard, version {version}\n"
    written = [str(p.relative_to(ROOT)) for d in set(PACKAGE_DIRS.values())
               for p in (ROOT / d).rglob("*.py")
               if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert not written, f"a second version in {written}"


def test_installed_wheel_is_typed_for_mypy_strict(dists: Dists, tmp_path: Path) -> None:
    """A user's mypy --strict over code that imports svcard, with the wheel installed: no
    "missing library stubs or py.typed marker" for any package, and real types checked."""
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=60)
    site = next(env_dir.glob("lib/python3*/site-packages"))
    with zipfile.ZipFile(dists.wheel) as archive:
        archive.extractall(site)
    imports = "\n".join(f"import {p}" for p in PACKAGES)
    (tmp_path / "user.py").write_text(imports + "\n" + textwrap.dedent("""
        from svcard.card.personalise import image_from_profile
        from svcard.fixtures import fixture_path
        from svcard.protocols.apdu import build_command

        image = image_from_profile(fixture_path("iep-demo.toml"))
        command: bytes = build_command(0x80, 0x5C, 0, 2, le=4)
        wrong: int = image
        """))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(env_dir / "bin" / "python"), "--config-file", os.devnull,
         "--follow-imports", "silent", str(tmp_path / "user.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if "py.typed" in e or "import-untyped" in e
                or "import-not-found" in e], done.stdout
    # the one error planted above: mypy knows what image_from_profile returns
    assert len(errors) == 1 and "user.py:" in errors[0] and "wrong" not in errors[0] \
        and "dict[str, Any]" in errors[0], done.stdout


NO_FCNTL = r"""
import importlib, sys
sys.modules["fcntl"] = None   # what a system without fcntl (Windows) has
for name in ("svcard.protocols", "svcard.card.personalise", "svcard.card.image",
             "svcard.host.cli.main"):
    importlib.import_module(name)

from pathlib import Path
from click.testing import CliRunner
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main

def run(*args):
    result = CliRunner().invoke(main, list(args), prog_name="svcard")
    return result.exit_code, result.output

work = Path(sys.argv[1])
code, out = run("--help")
assert code == 0 and out.startswith("Usage: svcard"), out
image = work / "card.json"
code, out = run("card", "new", str(fixture_path("iep-demo.toml")), "--out", str(image))
assert code == 0 and image.is_file(), out
code, out = run("card", "show", str(image))
assert code == 0 and "CNY" in out, out
# a card that opens its image takes the image's file lock: one line, exit 3, no traceback
code, out = run("terminal", "balance", "--card", f"virtual:{image}")
assert code == 3 and "file locks (fcntl)" in out and "Traceback" not in out, (code, out)
assert len(out.strip().splitlines()) == 1, out

from svcard.host.terminal.journal import Journal, JournalError
try:
    Journal(work / "journal.jsonl").write("t1", "started")
except JournalError as exc:
    assert "file locks (fcntl)" in str(exc), exc
else:
    raise AssertionError("the journal wrote without a lock")
assert sys.modules["fcntl"] is None
print("pure parts ok")
"""


def test_pure_parts_import_and_run_without_fcntl(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", NO_FCNTL, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("pure parts ok"), done.stdout
