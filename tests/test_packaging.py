"""Packaging: the `cosmofm` root is a lazy facade, `import cosmofm.data_cards` loads no
torch, and a non-editable install (`pip install .`) finds the shipped recipes and cards
through importlib.resources. Each check runs in a fresh interpreter."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("scripts", "data_cards", "pretrain", "heads", "finetune")  # pyproject.toml's package-dir


def _python(code: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


LIGHT = """
import sys
import cosmofm, cosmofm.data_cards, cosmofm.data_cards.readers, cosmofm.data_cards.io.catalogue
from cosmofm.data_cards import available_cards, load_card
assert load_card("sdss-like").modality == "spectrum" and "lsst-like" in available_cards()
heavy = sorted(m for m in ("torch", "transformers", "cosmofm.pretrain", "cosmofm.heads", "cosmofm.finetune") if m in sys.modules)
assert not heavy, heavy
"""


def test_cosmofm_and_data_cards_import_no_torch():
    _python(LIGHT)


def test_root_names_resolve_lazily():
    _python("""
import sys, cosmofm
assert "torch" not in sys.modules and "from_pretrained" in dir(cosmofm)
loader = cosmofm.from_pretrained
from cosmofm.finetune.release import from_pretrained
from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, CosmoFMModel
assert loader is from_pretrained
assert (cosmofm.CosmoFMConfig, cosmofm.CosmoFMModel, cosmofm.CosmoFMForPretraining) == (CosmoFMConfig, CosmoFMModel, CosmoFMForPretraining)
try:
    cosmofm.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("cosmofm.no_such_name resolved")
""")


INSTALLED = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import cosmofm
assert Path(cosmofm.__file__).resolve().is_relative_to(site), cosmofm.__file__  # the install, not the source tree
from cosmofm.data_cards.schema import CARDS_DIR, available_cards, load_card
assert Path(str(CARDS_DIR)).resolve().is_relative_to(site), CARDS_DIR
print("cards", ",".join(available_cards()))
assert load_card("sdss-like").name == "sdss-like"
from cosmofm.pretrain.recipe import PretrainRecipe, shipped_recipes, _recipes
assert Path(str(_recipes())).resolve().is_relative_to(site), _recipes()
print("recipes", ",".join(shipped_recipes()))
print("demo", PretrainRecipe.load("demo").model["hidden_size"])
"""


@pytest.mark.slow
def test_non_editable_install_finds_shipped_recipes_and_cards(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed, so pip cannot build the wheel offline (without build isolation)")
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ in it
    for name in PACKAGE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]

    # every module and shipped YAML of the source tree was installed (a subpackage left out of
    # pyproject.toml's list, or data left out of package-data, would not be)
    source_files = {(f"cosmofm/{p.relative_to(ROOT / 'scripts')}" if d == "scripts" else f"cosmofm/{p.relative_to(ROOT)}")
                    for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")}
    installed = {str(p.relative_to(site)) for p in (site / "cosmofm").rglob("*") if p.suffix in (".py", ".yaml")}
    assert source_files - installed == set()

    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}  # the editable finder comes after PYTHONPATH
    out = dict(line.split(" ", 1) for line in _python(INSTALLED, str(site), env=env, cwd=tmp_path).splitlines())
    assert out["cards"].split(",") == sorted(p.stem.replace("_", "-") for p in (ROOT / "data_cards" / "cards").glob("*.yaml"))
    assert out["recipes"].split(",") == sorted(p.stem for p in (ROOT / "pretrain" / "recipes").glob("*.yaml"))
    assert int(out["demo"]) > 0
    _python(LIGHT, env=env, cwd=tmp_path)  # the installed copy imports no torch either
