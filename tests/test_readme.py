"""The README's Python examples run as written (against a real loopback daemon)."""

from __future__ import annotations

import re
from pathlib import Path

from pyvhost.testing.processes import PyvhostProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(capsys, tmp_path):
    sock = str(tmp_path / "vhost.sock")
    daemon = PyvhostProcess(["loopback", "--socket", sock], sock)
    try:
        blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        assert len(blocks) >= 2
        for code in blocks:
            exec(compile(code.replace("/tmp/vhost.sock", sock), "README.md", "exec"), {})
    finally:
        status, _, err = daemon.stop()
    out = capsys.readouterr().out
    assert "b'hello'" in out
    assert "payload" in out  # the frame came back through the loopback
    assert status == 0, err


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def shell_commands(text: str) -> list[list[str]]:
    import shlex

    out = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip().rstrip("&").strip()
            if line:
                out.append(shlex.split(line))
    return out


def test_the_systemd_and_libvirt_sections_commands_are_ones_pyvhost_takes():
    from pyvhost.cli import build_parser

    parser = build_parser()
    seen = set()
    for title in ("Running under systemd", "Running under libvirt", "Installing"):
        for argv in shell_commands(section(title)):
            if argv[0] == "pyvhost" and not {"--help", "--version"} & set(argv):
                args = parser.parse_args(argv[1:])  # exits (fails) on an unknown option
                seen.add(args.command)
    assert {"systemd-units", "stats", "net", "libvirt-xml"} <= seen


def test_the_systemd_section_names_the_shipped_units_and_drop_in():
    from importlib.resources import files

    text = section("Running under systemd")
    shipped = {f.name for f in files("pyvhost.systemd").iterdir()}
    for name in ("pyvhost-net@.socket", "pyvhost-net@.service",
                 "pyvhost-net@.service.d-example.conf"):  # fmt: skip
        assert name in shipped and name in text
