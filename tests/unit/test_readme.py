"""The README's first lines are the two commands a newcomer runs; CI must run the same test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("```"), "the README must open with the two commands"
    end = lines.index("```", 1)
    return [line for line in lines[1:end] if line.strip()]


def test_readme_opens_with_install_demo_and_test_commands():
    install, test = _readme_commands()
    assert "pip install" in install and "raypdm demo" in install
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    _, test = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in [line.strip() for line in ci]
