"""Packaging: the npe2 manifest validates and ships inside the wheel; the reader hook answers."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _npe2() -> str:
    exe = shutil.which("npe2") or str(Path(sys.executable).parent / "npe2")
    if not Path(exe).exists():
        pytest.fail("npe2 is a runtime dependency and must be installed with the project")
    return exe


def test_npe2_validate_installed_plugin():
    result = subprocess.run([_npe2(), "validate", "napari-ciml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_top_level_manifest_is_the_packaged_one():
    top = ROOT / "napari.yaml"
    assert top.read_text() == (ROOT / "src" / "napari_ciml" / "napari.yaml").read_text()


def test_wheel_ships_manifest_and_entry_point(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("napari_ciml-*.whl")
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
