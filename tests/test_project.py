"""Project-level promises: the packages import, `import model` stays torch-free, README and CI agree."""

import re
import subprocess
import sys

import pytest

PACKAGES = ["compiler", "schedules", "runtime", "model", "train"]


def quick_start_commands(readme: str) -> list[str]:
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.e2e
def test_all_packages_import_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", f"import {', '.join(PACKAGES)}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "module", ["model", "model.ternary", "model.ternary.layouts", "model.config", "model.exact_reference"]
)
def test_formats_and_configs_do_not_import_torch_or_tvm(module):
    # the runtime imports these and must start fast; torch and TVM belong to other rooms
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_readme_quick_start_is_exactly_two_commands_and_ci_runs_the_second(repo):
    commands = quick_start_commands((repo / "README.md").read_text())
    assert len(commands) == 2, commands
    ci = (repo / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "'.ci/run' must run the README's test command verbatim"
    assert "set -euo pipefail" in ci  # so a failing test fails CI


@pytest.mark.unit
def test_pyproject_pins_what_must_be_pinned(repo):
    text = (repo / "pyproject.toml").read_text()
    for pin in ('"torch==2.13.0"', '"apache-tvm==0.27.0.post1"', '"apache-tvm-ffi==0.1.14.post1"'):
        assert pin in text
