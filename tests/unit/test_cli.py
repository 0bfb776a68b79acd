from __future__ import annotations

import subprocess
import sys

import pytest

from sd_operator import cli


def test_version_subcommand_prints_the_api_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert "sd-operator.dev/v1alpha1" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    bindir = sys.executable.rsplit("/", 1)[0]
    out = subprocess.run([f"{bindir}/sd-operator", "--help"], capture_output=True, text=True, check=True)
    assert "version" in out.stdout


def test_a_subcommand_is_required() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
