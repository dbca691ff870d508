"""The core runs headless: the CLI's work commands import no napari, Qt binding or magicgui.

`pip install napari-ciml` (no extra) gives the library and the ``ciml-core`` CLI without a GUI
stack (SPEC 2); `.ci/run` checks that in a venv without napari. This test checks the import side in
the test environment, where napari *is* installed, so a stray import would otherwise go unnoticed:
it runs the commands in a fresh interpreter (other tests in this pytest process import napari),
then lists the GUI modules that interpreter loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: Top-level packages the core must never import (napari, its plugin engine and every Qt binding).
GUI_PACKAGES = ("napari", "napari_ciml", "magicgui", "npe2", "qtpy", "superqt", "vispy",
                "PyQt5", "PyQt6", "PySide2", "PySide6")

SCRIPT = textwrap.dedent(
    """
    import importlib
    import json
    import pkgutil
    import sys
    from pathlib import Path

    import ciml_core
    from ciml_core.cli import main
    from ciml_core.data.phantoms import write_phantom_dataset

    root = Path(sys.argv[1])
    gui = tuple(sys.argv[2].split(","))


    def gui_modules():
        return sorted(m for m in sys.modules if m.split(".")[0] in gui)


    data = root / "data"
    (case,) = write_phantom_dataset("brats", 1, data, seed=5000, shape=(40, 40, 32), spacing=2.0)
    pred, report = root / "pred", root / "report.csv"
    codes = {
        "info": main(["info", "demo"]),
        "predict": main(["predict", str(case), "--out", str(pred), "--model", "demo",
                         "--device", "cpu"]),
        "evaluate": main(["evaluate", str(pred), str(data), "--out", str(report)]),
    }
    after_cli = gui_modules()
    # then every other ciml_core module (the library API, not only what the CLI reaches)
    names = sorted(m.name for m in pkgutil.walk_packages(ciml_core.__path__, "ciml_core."))
    for name in names:
        importlib.import_module(name)
    print("HEADLESS " + json.dumps({
        "codes": codes, "outputs": sorted(p.name for p in pred.iterdir()),
        "report": report.is_file(), "gui_after_cli": after_cli, "modules": names,
        "gui_after_all_modules": gui_modules(),
    }))
    """
)


def _run_headless(tmp_path) -> tuple[dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # no display and no Qt platform: a GUI import that slipped in must not find a screen either
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), ",".join(GUI_PACKAGES)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("HEADLESS ")]
    return json.loads(line.removeprefix("HEADLESS ")), result.stderr


def test_core_runs_and_imports_without_gui_packages(tmp_path):
    found, stderr = _run_headless(tmp_path)
    # the CLI's work commands ran, in process
    assert found["codes"] == {"info": 0, "predict": 0, "evaluate": 0}, stderr[-4000:]
    assert "Phantom_05000.nii.gz" in found["outputs"] and found["report"]
    assert found["gui_after_cli"] == [], (
        f"ciml_core imported GUI modules while running the CLI: {found['gui_after_cli']}")
    # and no ciml_core module, imported on its own, pulls a GUI package in either
    assert {"ciml_core.cli", "ciml_core.infer", "ciml_core.explain"} <= set(found["modules"])
    assert found["gui_after_all_modules"] == [], (
        f"importing ciml_core modules pulled in GUI modules: {found['gui_after_all_modules']}")
