"""The breathcast command line: subcommands, outputs, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from breathcast.cli import main
from breathcast.io.dataset import open_dataset


def test_simulate_writes_a_dataset(tmp_path, capsys):
    """`breathcast simulate` writes the requested patients and says where."""
    code = main(["simulate", "--patients", "2", "--scans", "2", "--grid", "16", "--seed", "3", "--out", str(tmp_path), "-q"])
    assert code == 0
    assert open_dataset(tmp_path).patients == ["patient_000", "patient_001"]
    assert "wrote 2 patient(s)" in capsys.readouterr().out


def test_demo_writes_the_figures(tmp_path, capsys):
    """`breathcast demo` simulates a patient, lets the shipped model predict, and writes both PNGs."""
    assert main(["demo", "--scans", "4", "--out", str(tmp_path)]) == 0
    for name in ("demo_patient.png", "demo_prediction.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "predicted position off by" in capsys.readouterr().out


def test_demo_without_the_model(tmp_path):
    """`breathcast demo --no-model` simulates and draws only, on any grid."""
    assert main(["demo", "--grid", "24", "--scans", "4", "--no-model", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo_patient.png").is_file() and not (tmp_path / "demo_prediction.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patients", "-1"], "--patients: must be at least 0, got -1"),
        (["--patients", "1", "--grid", "8"], "--grid: must be at least 16, got 8"),
        (["--patients", "1", "--grid", "x"], "--grid: expected an integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    """Bad arguments give exit code 2 and a message naming the argument."""
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *args, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_exits_2_without_traceback(tmp_path):
    """An output path that cannot be created is a one-line error and exit code 2, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "breathcast.cli", "simulate", "--patients", "1", "--grid", "16", "--out", str(blocker / "sub")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("breathcast: error: cannot create output directory")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_reads_well():
    """Top-level help lists the subcommands with a sentence each."""
    result = subprocess.run([sys.executable, "-m", "breathcast.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "simulate" in result.stdout and "demo" in result.stdout


def test_simulate_with_nothing_to_simulate_is_one_line(tmp_path, capsys):
    """No cartoon patients and no --anatomy-ct: exit code 2, and the message says what to give."""
    assert main(["simulate", "--patients", "0", "--out", str(tmp_path)]) == 2
    assert "--anatomy-ct" in capsys.readouterr().err
