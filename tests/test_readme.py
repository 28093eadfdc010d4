"""The README keeps exactly two set-up commands, and CI runs the test one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("## Use", 1)[0]
    commands = [line for line in setup.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2
    assert "interp lens smollm2-135m" in commands[0]
    assert commands[1].endswith("python -m pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
