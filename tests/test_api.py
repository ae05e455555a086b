"""The public Python API: `import hetlm` is light, every exported name resolves, and importing the CLI
leaves the environment alone (its defaults apply when a command runs)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import hetlm

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_WAIT_POLICY")


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_import_hetlm_loads_neither_torch_nor_transformers():
    out = _python("import sys, hetlm, hetlm.cli; print(sorted({'torch', 'transformers', 'polars'} & set(sys.modules)))")
    assert out.strip() == "[]"


def test_importing_the_cli_leaves_the_environment_and_a_command_sets_its_defaults(tmp_path):
    code = ("import os; from typer.testing import CliRunner; from hetlm.cli import app; "
            f"keys = {DEFAULTS!r}; print([k for k in keys if k in os.environ]); "
            f"CliRunner().invoke(app, ['report', {str(tmp_path / 'missing')!r}]); "
            "print([os.environ.get(k) for k in keys])")
    before, after = _python(code).strip().splitlines()[-2:]
    assert before == "[]"
    assert after == "['1', '1', 'false', 'PASSIVE']"


def test_every_exported_name_resolves():
    for name in hetlm.__all__:
        value = getattr(hetlm, name)
        assert not isinstance(value, types.ModuleType) and value.__name__ == name, name
    assert set(hetlm.__all__) <= set(dir(hetlm))


def test_prepare_is_the_function_after_its_module_is_imported():
    import hetlm.prepare  # noqa: F401 (binds the submodule; the public name must stay the function)
    from hetlm import prepare

    assert callable(prepare) and prepare is sys.modules["hetlm.prepare"].prepare
