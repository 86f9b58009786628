"""Architecture rules, checked on the import statements of the source files (via ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level packages its modules must never import
FORBIDDEN = {
    "common": ("flwr", "client", "server", "simulations"),
    "client": ("server", "simulations"),
    "server": ("client", "simulations"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Every module an import statement anywhere in ``source`` names (relative ones resolved)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                prefix = ".".join(base[:keep])
                target = ".".join(p for p in (prefix, node.module or "") if p)
            else:
                target = node.module or ""
            found.append(target)
            # ``from x import y`` may import the submodule x.y.
            found.extend(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def violations(path: Path, banned: tuple[str, ...]) -> list[str]:
    """Return ``"<file>: imports <module>"`` for each import of a banned top-level package."""
    source = path.read_text(encoding="utf-8")
    names = imported_modules(source, _module_name(path), is_package=path.name == "__init__.py")
    rel = path.relative_to(ROOT)
    bad = sorted({n for n in names if n.split(".")[0] in banned})
    return [f"{rel}: imports {name}" for name in bad]


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_has_sources(package):
    files = _sources(package)

    assert (ROOT / package / "__init__.py") in files
    assert len(files) >= 2, f"{package}/ should hold modules to check"


@pytest.mark.parametrize(("package", "banned"), sorted(FORBIDDEN.items()))
def test_package_never_imports_forbidden_layers(package, banned):
    found = [v for path in _sources(package) for v in violations(path, banned)]

    assert not found, f"{package}/ must not import {', '.join(banned)}:\n" + "\n".join(found)


def test_common_may_use_hydra_for_its_config_schemas():
    names = imported_modules((ROOT / "common" / "config.py").read_text(encoding="utf-8"),
                             "common.config")

    assert any(n.startswith("hydra") for n in names)
    assert violations(ROOT / "common" / "config.py", FORBIDDEN["common"]) == []


# --- the checker itself -------------------------------------------------------------------


def test_checker_finds_every_form_of_import(tmp_path, monkeypatch):
    package = tmp_path / "common"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    module = package / "bad.py"
    module.write_text(
        "import numpy as np\n"
        "import flwr.common\n"
        "from server.app import make_server_app\n"
        "from common.errors import DataError\n"
        "def later():\n"
        "    from simulations import run\n"
        "    import client.app as site\n"
        "    return run, site\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)

    found = violations(module, FORBIDDEN["common"])

    assert found == [
        "common/bad.py: imports client.app",
        "common/bad.py: imports flwr.common",
        "common/bad.py: imports server.app",
        "common/bad.py: imports server.app.make_server_app",
        "common/bad.py: imports simulations",
        "common/bad.py: imports simulations.run",
    ]


def test_checker_resolves_relative_imports():
    source = "from . import errors\nfrom ..server import app\nfrom .kmeans import assign\n"

    names = imported_modules(source, "common.segment_model")

    assert "common.errors" in names
    assert "common.kmeans.assign" in names
    assert "server.app" in names


def test_checker_ignores_names_that_only_start_like_a_layer():
    names = imported_modules("import clientele\nfrom servers import x\n", "common.x")

    assert not [n for n in names if n.split(".")[0] in FORBIDDEN["common"]]
