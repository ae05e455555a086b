"""The modules of hetlm/ import downward only: no import cycle, counting imports inside functions."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hetlm"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the hetlm modules it imports anywhere in its file (top level or inside a function)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from . import metrics` names a module, `from .train import x` an attribute of one
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "hetlm.experiment" in graph["hetlm.cli"]  # imported inside a command's function
    assert "hetlm.cluster.base" in graph["hetlm.cluster.hetlm"]
    assert "hetlm.metrics" in graph["hetlm.evaluate"]  # `from . import metrics`


def test_no_import_cycle():
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_import_and_the_cli_load_no_heavy_library():
    """`import hetlm`, `hetlm --help` and `--version` stay fast: torch, transformers, polars and sklearn are
    imported by the commands that use them, not at start-up."""
    import subprocess
    import sys

    code = ("import sys, hetlm, hetlm.cli; "
            "print([m for m in ('torch', 'transformers', 'polars', 'sklearn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "hetlm.cli", "--version"], capture_output=True, text=True,
                             cwd=PACKAGE.parent)
    assert version.returncode == 0 and version.stdout.strip() == "hetlm 0.1.0"


def test_a_wrong_path_fails_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    missing = str(tmp_path / "missing")
    commands = [["train", missing, "--out", str(tmp_path / "run")],
                ["generate", missing, missing, "--out", str(tmp_path / "g.parquet")],
                ["experiment", missing + ".json", "--out", str(tmp_path / "run")],
                ["score", missing, missing, "--source", "taobao", "--out", str(tmp_path / "s.parquet")]]
    code = ("import sys; from typer.testing import CliRunner; from hetlm.cli import app; "
            f"codes = [CliRunner().invoke(app, c).exit_code for c in {commands!r}]; "
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[2, 2, 2, 2] False"
