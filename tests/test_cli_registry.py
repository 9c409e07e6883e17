"""The subcommand registry: commands register themselves as entry points, the runtime names none."""
import ast
import sys
from pathlib import Path

import pytest

from clipfuse.runtime import cli

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _declared():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["entry-points"]["clipfuse.commands"]


def test_installed_entry_points_match_pyproject():
    # a stale editable install (pyproject changed, not reinstalled) would hide or keep commands
    assert cli.registered_commands() == _declared()


def test_every_command_module_has_the_interface_and_help_order_is_the_flow():
    commands = cli.load_commands()
    assert [name for name, _ in commands][:4] == ["heads", "export", "export-text", "build"]
    orders = [module.ORDER for _, module in commands]
    assert len(set(orders)) == len(orders), "two commands share an ORDER: --help order would depend on names"
    for name, module in commands:
        assert isinstance(module.HELP, str) and module.HELP, name
        assert callable(module.add_arguments) and callable(module.run), name


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("clipfuse."):
            yield node.value  # a module named by string (importlib.import_module, a registry)


def test_runtime_imports_no_dependent_package():
    # runtime <- export <- benchmarks: no runtime module imports export/benchmarks, not even by name
    for path in (ROOT / "runtime").rglob("*.py"):
        for module in _imported_modules(path):
            assert not module.startswith(("clipfuse.export", "clipfuse.benchmarks")), \
                f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize("package", ["export", "benchmarks"])
def test_no_command_module_imports_the_cli(package):
    # shared CLI helpers live in runtime/cliargs.py; importing runtime.cli from a command is a cycle
    for path in (ROOT / package).rglob("*.py"):
        assert "clipfuse.runtime.cli" not in set(_imported_modules(path)), f"{path.relative_to(ROOT)} imports runtime.cli"
