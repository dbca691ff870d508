"""The ciml-core command line: parser, version, help and error reporting."""

import subprocess
import sys

import pytest

from ciml_core import __version__
from ciml_core.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ciml-core {__version__}"
    assert __version__ == "0.1.0"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "phantom" in out and "usage: ciml-core" in out


def test_phantom_help_names_options(capsys):
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    out = capsys.readouterr().out
    for option in ("--kind", "--cases", "--out", "--seed", "--shape", "{brats,shapes,petct,brain}"):
        assert option in out


def test_console_script_runs():
    exe = subprocess.run([sys.executable, "-m", "ciml_core.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert exe.stdout.strip() == f"ciml-core {__version__}"


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code = main(["phantom", "--kind", "brats", "--cases", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ciml-core phantom: error:") and "cases" in err
    assert len(err.strip().splitlines()) == 1
