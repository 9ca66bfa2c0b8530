"""The npm lockfile check of scripts/audit refuses what it promises to refuse."""

import json
import pathlib
import subprocess
import sys

import pytest

CHECKER = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "npm-lockfiles.py"


def run_in_repo(tmp_path, files):
    """Commits `files` to a fresh git repository and runs the checker there."""
    subprocess.run(["git", "init", "--quiet", str(tmp_path)], check=True)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    return subprocess.run(
        [sys.executable, str(CHECKER)], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )


def package(deps):
    return {"name": "fixture", "version": "0.0.0", "private": True, "dependencies": deps}


def lock(packages):
    entries = {"": {"name": "fixture", "version": "0.0.0"}}
    entries.update(packages)
    return {"name": "fixture", "lockfileVersion": 3, "packages": entries}


GOOD = {"version": "1.0.0", "integrity": "sha512-AAAA", "license": "MIT"}


def test_a_clean_lockfile_passes(tmp_path):
    result = run_in_repo(tmp_path, {
        "ui/package.json": package({"a": "1.0.0", "b": "2.0.0"}),
        "ui/package-lock.json": lock({
            "node_modules/a": GOOD,
            "node_modules/b": {**GOOD, "license": "(MIT OR GPL-3.0)"},
        }),
    })
    assert result.returncode == 0, result.stderr
    assert "2 packages" in result.stdout


@pytest.mark.parametrize(
    "files, why",
    [
        ({"ui/package.json": package({"a": "1.0.0"})}, "no package-lock.json"),
        (
            {
                "ui/package.json": package({"a": "^1.0.0"}),
                "ui/package-lock.json": lock({"node_modules/a": GOOD}),
            },
            "not an exact version",
        ),
        (
            {
                "ui/package.json": package({"a": "1.0.0"}),
                "ui/package-lock.json": lock({"node_modules/a": {**GOOD, "integrity": "sha1-AAAA"}}),
            },
            "no sha512 integrity",
        ),
        (
            {
                "ui/package.json": package({"a": "1.0.0"}),
                "ui/package-lock.json": lock({"node_modules/a": {**GOOD, "license": "AGPL-3.0"}}),
            },
            "not a permissive licence",
        ),
        (
            {
                "ui/package.json": package({"a": "1.0.0"}),
                "ui/package-lock.json": lock(
                    {"node_modules/a": {**GOOD, "license": "MIT AND SSPL-1.0"}}
                ),
            },
            "not a permissive licence",
        ),
    ],
)
def test_a_broken_rule_fails(tmp_path, files, why):
    result = run_in_repo(tmp_path, files)
    assert result.returncode == 1
    assert why in result.stderr
