"""The README keeps exactly two set-up commands, and CI runs both of them verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("## Use", 1)[0]
    return [line for line in setup.splitlines() if line.startswith("pip install")]


def test_readme_has_a_main_and_a_test_command():
    main, test = readme_setup_commands()
    assert main.startswith("pip install torch==2.13.0 && pip install -e . &&")
    assert "interp lens smollm2-135m" in main and "--target" in main
    assert test.startswith('pip install torch==2.13.0 && pip install -e ".[test]" &&')
    assert test.endswith("python -m pytest -q")


def test_ci_runs_both_readme_commands_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in readme_setup_commands():
        assert command in ci_lines, f"the README command is not run verbatim by .ci/run:\n{command}"


def test_ci_runs_the_main_command_in_a_fresh_environment_and_checks_its_table():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m venv" in ci and "INTERP_CACHE=" in ci
    assert ".ci/check_lens_output.py" in ci
