"""`pip install .` and `pip install git+<url>` (issue #27 item 7): the wheel holds the `xvlm` package, its `xvlm`
console command and the shipped default model, and nothing of the app. Installed into a scratch venv under the test's
temporary folder that reuses this environment's dependencies (a .pth entry to its site-packages; `--no-deps`), and
run from outside the checkout so that the repository cannot be imported by accident. Offline: no index is read."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "fixtures" / "official-xvlm-small" / "img_b.png"
SOURCE = ("pyproject.toml", "README.md", "xvlm", "weights")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "xvlm").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert not any(name.split(".")[0] in ("app", "tests", "assets") for name in listed)


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONPATH="")
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def scratch_venv(where: Path) -> Path:
    """A venv whose site-packages also reads this environment's (torch & co. are not installed twice)."""
    venv.EnvBuilder(with_pip=False).create(where)
    (purelib,) = where.glob("lib/python3*/site-packages")
    (purelib / "_reuse_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where / "bin" / "python"


def run_installed(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the working tree (a copy of the files that make the package, so no build/ folder is
    left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    r = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.endswith(".dist-info/" + n.split("/")[-1])}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"xvlm"}       # no app/, assets/, tests/, weights/
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        assert f"xvlm/weights/xvlm-shapes/{f}" in names
    from xvlm.registry import list_models
    assert {n for n in names if n.startswith("xvlm/model_configs/")} == {
        f"xvlm/model_configs/{name}.json" for name in list_models()}                # the registry travels as data
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "xvlm = xvlm.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = {line.split()[1].split(">")[0].split("=")[0].lower() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert {"torch", "timm", "transformers", "safetensors", "huggingface_hub"} <= requires
    assert "gradio" not in requires                                             # the app is not the library


def test_installed_wheel_grounds_with_the_shipped_model(wheel, tmp_path):
    python = scratch_venv(tmp_path / "venv")
    r = pip("--python", str(python), "install", "--no-deps", str(wheel), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_installed(python, "-c", "import xvlm, xvlm.grounder as g; print(xvlm.__file__); print(g.DEFAULT_WEIGHTS)",
                      cwd=tmp_path)
    module, weights = r.stdout.split()
    assert Path(module).is_relative_to(tmp_path / "venv") and Path(weights).is_relative_to(tmp_path / "venv")
    r = run_installed(python, "-c", "import xvlm; print(' '.join(xvlm.list_models())); "
                                    "print(xvlm.create_model('bench-tiny').cfg.vision.kind)", cwd=tmp_path)
    from xvlm.registry import list_models
    assert r.stdout.split() == list_models() + ["vit"], r.stderr
    r = run_installed(tmp_path / "venv" / "bin" / "xvlm", "ground", str(IMAGE), "a red circle", "--json",
                      "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[0])
    assert out["phrase"] == "a red circle" and len(out["box_xyxy"]) == 4 and 0 <= out["itm"] <= 1
    r = run_installed(tmp_path / "venv" / "bin" / "xvlm", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "ground" in r.stdout


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_pip_install_from_a_git_url(tmp_path):
    """`pip install git+<url>` of the committed HEAD; file:// stands in for the repository's URL."""
    python = scratch_venv(tmp_path / "venv")
    r = pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", f"git+file://{ROOT}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_installed(python, "-c", "from xvlm.grounder import DEFAULT_WEIGHTS as w; print((w / 'config.json')"
                                    ".is_file(), w)", cwd=tmp_path)
    ok, weights = r.stdout.split()
    assert ok == "True" and Path(weights).is_relative_to(tmp_path / "venv"), r.stdout + r.stderr
