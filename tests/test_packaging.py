"""Packaging: the npe2 manifest validates and ships inside the wheel; the reader hook answers;
the core's requirements hold no GUI stack (napari, Qt and npe2 come with the ``napari`` extra)."""

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _npe2() -> str:
    exe = shutil.which("npe2") or str(Path(sys.executable).parent / "npe2")
    if not Path(exe).exists():
        pytest.fail("npe2 comes with the napari extra (and so with the testing extra)")
    return exe


def test_npe2_validate_installed_plugin():
    result = subprocess.run([_npe2(), "validate", "napari-ciml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_top_level_manifest_is_the_packaged_one():
    top = ROOT / "napari.yaml"
    assert top.read_text() == (ROOT / "src" / "napari_ciml" / "napari.yaml").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (built,) = out.glob("napari_ciml-*.whl")
    return built


def _requirements(wheel: Path) -> dict[str, list[str]]:
    """The wheel's Requires-Dist names (lower case), by extra ('' for the core requirements)."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    by_extra: dict[str, list[str]] = {}
    for requirement in Parser().parsestr(metadata.decode()).get_all("Requires-Dist") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", requirement.strip()).group(0)
        by_extra.setdefault(extra.group(1) if extra else "", []).append(name.lower())
    return by_extra


def test_core_requirements_hold_no_gui_stack(wheel):
    requirements = _requirements(wheel)
    core = {name.split("[")[0] for name in requirements[""]}
    assert {"numpy", "torch", "monai", "nibabel", "safetensors"} <= core
    gui = {"napari", "magicgui", "qtpy", "npe2", "superqt", "pyqt5", "pyqt6", "pyside2", "pyside6"}
    assert not core & gui, f"GUI packages in the core requirements: {sorted(core & gui)}"
    # the plugin's extra, the user-facing extra with a Qt binding, and the test extra on top
    assert {"napari", "qtpy", "npe2"} <= set(requirements["napari"])
    assert {"napari-ciml[napari]", "napari[pyqt6]"} <= set(requirements["all"])
    assert {"napari-ciml[all]", "pytest", "pytest-qt", "pytest-xvfb", "ruff"} <= set(
        requirements["testing"])
    # magicgui is never imported by the project: no extra asks for it
    assert not any("magicgui" in names for names in requirements.values())


def test_wheel_ships_manifest_and_entry_point(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_ciml/napari.yaml" in names
        assert "ciml_core/cli.py" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        manifest = zf.read("napari_ciml/napari.yaml")
    assert "napari-ciml = napari_ciml:napari.yaml" in entry_points
    assert "ciml-core = ciml_core.cli:main" in entry_points
    extracted = tmp_path / "napari.yaml"
    extracted.write_bytes(manifest)
    result = subprocess.run([_npe2(), "validate", str(extracted)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
