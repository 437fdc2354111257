import subprocess
import sys

import parallax_attention
from parallax_attention.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert parallax_attention.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "usage: plx" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "parallax_attention.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Parallax attention" in out.stdout
