"""The layout's rules, read from every module's imports (including those inside functions).

* the core imports only the standard library, torch, safetensors, numpy, the errors module and
  itself: no host adapter, no demo, no command, no test helper, no diffusers/transformers/WebUI;
* host adapters never import the demo or the command line;
* nothing in the package imports a test or bench helper.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib_scheduled_lora"
CORE_THIRD_PARTY = {"torch", "safetensors", "numpy"}
TEST_HELPERS = {"support", "tests", "bench", "tiny_models", "sd_layouts", "conftest"}


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; the package uses absolute ones")
    return names


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_no_host_demo_or_heavy_package(path):
    for name in imports(path):
        top = name.split(".")[0]
        if top == "lib_scheduled_lora":
            assert name.startswith(("lib_scheduled_lora.core", "lib_scheduled_lora.errors")), f"{path}: {name}"
        else:
            assert top in sys.stdlib_module_names or top in CORE_THIRD_PARTY, f"{path}: imports {name}"


@pytest.mark.parametrize("path", modules("hosts"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_host_adapters_do_not_know_the_demo_or_the_command_line(path):
    for name in imports(path):
        assert not name.startswith(("lib_scheduled_lora.demo", "lib_scheduled_lora.commands")), f"{path}: {name}"


@pytest.mark.parametrize("path", modules(""), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_imports_no_test_or_bench_helper(path):
    for name in imports(path):
        assert name.split(".")[0] not in TEST_HELPERS, f"{path}: {name}"


def test_the_rules_see_a_violation(tmp_path):
    """The checker itself: a core-style module importing diffusers is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import diffusers\n")
    assert imports(bad) == ["diffusers"]
    assert "diffusers" not in sys.stdlib_module_names and "diffusers" not in CORE_THIRD_PARTY
