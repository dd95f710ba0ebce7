"""The ``hypeman-ingress`` command line: help texts, ``validate`` and ``render`` exit codes and their
``file:line: message`` output, and ``diff`` exiting 2 on any error (``diff``/``apply`` against a real Caddy
are in ``test_daemon.py``).

Most cases call :func:`reconciler.cli.main` in-process (fast); the console script itself and an error
that used to escape as a traceback run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.caddy.admin import AdminClient
from reconciler.cli import main
from tests.helpers import ROOT, free_port, ingress_yaml, instance_yaml, write

SCRIPT = Path(sys.executable).parent / "hypeman-ingress"
PROBLEM_LINE = re.compile(r"^(?P<file>/[^:]+):(?P<line>\d+): (?P<message>.+)$")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the caller's environment; Caddy's admin address is a free, closed port."""
    for key in list(os.environ):
        if key.startswith(("HYPEMAN_", "CADDY_", "ACME_", "TLS_", "INGRESS_", "CLOUDFLARE_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HYPEMAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CADDY_ADMIN_PORT", str(free_port()))
    monkeypatch.setenv("CADDY_LISTEN_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("CADDY_HTTP_PORT", str(free_port()))
    monkeypatch.setenv("CADDY_HTTPS_PORT", str(free_port()))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], env={**os.environ, **(env or {})}, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


def sources(tmp: Path) -> tuple[Path, Path]:
    manifests, instances = tmp / "manifests", tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm"))
    write(manifests / "good.yaml", ingress_yaml("good", "good.test", 80, "vm", 8080))
    return manifests, instances


def broken_files(manifests: Path) -> dict[str, tuple[int, str]]:
    """Three kinds of problem beside the good file; file -> (line, a piece of the message)."""
    write(manifests / "syntax.yaml", "name: syntax\nrules:\n  - match: {hostname: s.test\n    target: x\n")
    write(manifests / "nested" / "schema.yaml",
          ingress_yaml("fine", "fine.test", 80, "vm", 8080) + "---\n"
          + "name: schema\nrules:\n  - match: {hostname: c.test, port: 99999}\n    target: {instance: vm, port: 80}\n")
    write(manifests / "zz-conflict.yaml", ingress_yaml("zz-conflict", "good.test", 80, "vm", 8081))
    return {
        str(manifests / "syntax.yaml"): (4, "YAML syntax error"),
        str(manifests / "nested" / "schema.yaml"): (8, "rules[0].match.port: 99999 is greater than the maximum"),
        str(manifests / "zz-conflict.yaml"): (1, f"good.test:80 is already claimed by ingress 'good' in "
                                                 f"{manifests / 'good.yaml'}:1"),
    }


def problem_lines(text: str) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        m = PROBLEM_LINE.match(line)
        assert m, f"not a file:line: message line: {line!r}"
        assert m["file"] not in out, f"two problems for {m['file']}"
        out[m["file"]] = (int(m["line"]), m["message"])
    return out


# -- help ----------------------------------------------------------------------------------------------

def test_top_level_help_names_the_purpose_and_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: hypeman-ingress")
    assert "ingress manager" in r.stdout and "Caddy" in r.stdout
    for command in ("run", "validate", "render", "diff", "apply", "status"):
        assert re.search(rf"^\s+{command}\s+\S", r.stdout, re.M), f"{command} missing from --help"
    assert "CADDY_BINARY" in r.stdout and "Quick start" in r.stdout


@pytest.mark.parametrize(("command", "purpose"), [
    ("run", "watch every manifest dir"),
    ("validate", "'file:line: message' per problem"),
    ("render", "Caddy JSON config"),
    ("diff", "Exit 0 when they are the same, 1 when they differ, 2 on error"),
    ("apply", "Run one pass"),
    ("status", "Exit 0 when every ingress is ready"),
])
def test_each_command_help_exits_0_and_says_what_it_does(command: str, purpose: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse re-wraps descriptions
    assert out.startswith(f"usage: hypeman-ingress {command}")
    assert purpose in out
    assert "--data-dir" in out


# -- validate ------------------------------------------------------------------------------------------

def test_validate_valid_input_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, _ = sources(tmp_path)
    write(manifests / "more" / "two.yaml", ingress_yaml("two", "two.test", 8080, "vm", 80))
    assert main(["validate", str(manifests)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "2 ingress(es) accepted, 0 problem(s): valid" in err
    assert main(["validate", str(manifests / "good.yaml"), str(manifests / "more")]) == 0  # files and dirs


def test_validate_prints_one_file_line_message_per_problem_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, _ = sources(tmp_path)
    expected = broken_files(manifests)
    assert main(["validate", str(manifests)]) == 1
    out, err = capsys.readouterr()
    got = problem_lines(out)
    assert set(got) == set(expected), out
    for file, (line, piece) in expected.items():
        assert got[file][0] == line, (file, got[file])
        assert piece in got[file][1], (file, got[file])
    assert "2 ingress(es) accepted, 3 problem(s): invalid" in err  # good + the valid document beside schema

    # the same with files named on the command line; --quiet leaves only the problems
    assert main(["validate", "-q", *expected]) == 1
    out, err = capsys.readouterr()
    assert set(problem_lines(out)) == {str(manifests / "syntax.yaml"), str(manifests / "nested" / "schema.yaml")}
    assert err == ""  # (without good.yaml the conflict is gone)


def test_validate_of_a_missing_path_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 1
    out, _ = capsys.readouterr()
    assert str(tmp_path / "nope") in out


def test_validate_console_script_exit_codes(tmp_path: Path) -> None:
    manifests, _ = sources(tmp_path)
    assert run_cli("validate", str(manifests)).returncode == 0
    broken_files(manifests)
    r = run_cli("validate", str(manifests))
    assert r.returncode == 1 and len(r.stdout.splitlines()) == 3, r.stdout + r.stderr


# -- render --------------------------------------------------------------------------------------------

def test_render_exits_0_and_prints_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, instances = sources(tmp_path)
    assert main(["render", "--manifests", str(manifests), "--instances", str(instances)]) == 0
    out, err = capsys.readouterr()
    config = json.loads(out)
    assert "admin" in config and "good.test" in out
    assert err == ""


def test_render_exits_1_when_there_are_problems_and_still_renders_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, instances = sources(tmp_path)
    expected = broken_files(manifests)
    assert main(["render", "--manifests", str(manifests), "--instances", str(instances)]) == 1
    out, err = capsys.readouterr()
    config = json.loads(out)  # stdout stays one JSON document
    assert "good.test" in out and "fine.test" in out and "c.test" not in out
    assert set(problem_lines(err)) == set(expected)
    assert config["admin"]["listen"].startswith("127.0.0.1:")


def test_render_console_script_exit_codes(tmp_path: Path) -> None:
    manifests, instances = sources(tmp_path)
    args = ("render", "--manifests", str(manifests), "--instances", str(instances))
    assert run_cli(*args).returncode == 0
    write(manifests / "bad.yaml", "name: Not_A_Name\nrules: []\n")
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr
    assert f"{manifests / 'bad.yaml'}:1: " in r.stderr
    json.loads(r.stdout)


# -- diff: 2 on any error --------------------------------------------------------------------------------

def test_diff_with_caddy_unreachable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, instances = sources(tmp_path)
    assert main(["diff", "--manifests", str(manifests), "--instances", str(instances)]) == 2
    _out, err = capsys.readouterr()
    assert err.startswith("error: ") and "unreachable" in err


def test_diff_exits_2_on_an_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifests, instances = sources(tmp_path)

    def unreadable(self: AdminClient) -> object:
        raise PermissionError(13, "Permission denied", str(tmp_path / "data"))

    monkeypatch.setattr(AdminClient, "get_config", unreadable)
    assert main(["diff", "--manifests", str(manifests), "--instances", str(instances)]) == 2
    _out, err = capsys.readouterr()
    assert err == f"error: PermissionError: [Errno 13] Permission denied: '{tmp_path / 'data'}'\n"


def test_diff_exits_2_on_an_unusable_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests, instances = sources(tmp_path)
    assert main(["diff", "--manifests", str(manifests) + "\x00", "--instances", str(instances)]) == 2
    _out, err = capsys.readouterr()
    assert err.startswith("error: ValueError: ") and "null" in err


def test_diff_exits_2_without_a_traceback_on_a_bad_admin_address(tmp_path: Path) -> None:
    """``CADDY_ADMIN_ADDRESS=256.1.1.1`` used to escape as ``httpx.InvalidURL`` (traceback, exit 1)."""
    manifests, instances = sources(tmp_path)
    r = run_cli("diff", "--manifests", str(manifests), "--instances", str(instances),
                env={"CADDY_ADMIN_ADDRESS": "256.1.1.1"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and "256.1.1.1" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_other_commands_still_raise_unexpected_errors(tmp_path: Path) -> None:
    manifests, instances = sources(tmp_path)
    with pytest.raises(ValueError, match="null"):
        main(["render", "--manifests", str(manifests) + "\x00", "--instances", str(instances)])
