"""The package installs and its console scripts work outside the repository.

``pip install --no-deps --target DIR <checkout>`` (the dependencies are this
venv's), then, from a scratch directory with DIR first on the path: every
console script's ``--help``, and ``deml-train`` on the demo config's smoke run
given by absolute path.  The installed copy, not the checkout, must be what runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("deml-train", "deml-evaluate", "deml-export", "deml-prepare",
           "deml-convert-weights", "deml-eval-features")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's shell
    return target, env


def test_installed_copy_is_imported_and_carries_the_configs(installed, tmp_path):
    target, env = installed
    out = subprocess.run([sys.executable, "-c", "import deml_jax, configs.common as c; "
                          "print(deml_jax.__file__); print(c.__file__)"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(target.resolve()), line


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_help(installed, tmp_path, script):
    target, env = installed
    exe = target / "bin" / script
    assert exe.exists(), f"pyproject.toml declares no console script {script}"
    out = subprocess.run([str(exe), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in (out.stdout + out.stderr).lower() or "--" in out.stdout


@pytest.mark.slow
def test_deml_train_runs_from_any_directory(installed, tmp_path):
    target, env = installed
    config = ROOT / "configs" / "demo_digits.py"
    workdir = tmp_path / "run"
    out = subprocess.run([str(target / "bin" / "deml-train"), f"--config={config}:runlocal",
                          f"--workdir={workdir}", "--config.eval.pictures=False"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results, results
    assert (tmp_path / "data" / "tfds").is_dir()  # relative data_dir: the user's cwd
