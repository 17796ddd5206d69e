"""export: '-' is stdout, the format from the extension, status on stderr, SVG/PNG pictures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from kvminspect.cli import main, run_one
from kvminspect.commands import export
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.session import Session
from tests.conftest import open_fixture

FIXTURE = "6.1-shadow"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (apt-get install graphviz)")


@pytest.fixture
def session() -> Session:
    return Session(open_fixture(FIXTURE))


def unsync_leaves(s: Session) -> set[str]:
    """The unsync shadow pages of the fixture's VM, as "0x…"."""
    g = s.graph(s.kernel.vms()[0])
    return {hex(a) for a in g.nodes if g.sp(a).unsync is True}


def test_dash_is_stdout_and_status_goes_to_stderr(session: Session, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    run_one(session, ["export", "-f", "dot", "-"])
    out, err = capfd.readouterr()
    assert out.startswith('digraph "vm0" {') and out.rstrip().endswith("}")
    assert "to stdout (dot)" in err and "wrote" not in out
    assert not (tmp_path / "-").exists()
    run_one(session, ["export", "-f", "json", "-"])
    assert json.loads(capfd.readouterr().out)["vm"]["index"] == 0


@pytest.mark.parametrize(("name", "fmt"), [("g.dot", "dot"), ("g.gv", "dot"),
                                           ("g.graphml", "graphml"), ("G.JSON", "json")])
def test_format_follows_the_extension(session: Session, tmp_path: Path, name: str, fmt: str,
                                      capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / name
    capsys.readouterr()
    run_one(session, ["export", str(path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["vms"][0]["format"] == fmt
    data = path.read_text()
    if fmt == "dot":
        assert data.startswith("digraph")
    elif fmt == "graphml":
        assert nx.read_graphml(path).number_of_nodes() == doc["vms"][0]["nodes"]
    else:
        assert len(json.loads(data)["nodes"]) == doc["vms"][0]["nodes"]


def test_format_errors(session: Session, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="from its extension"):
        run_one(session, ["export", str(tmp_path / "g.txt")])
    with pytest.raises(UsageError, match="needs --format"):
        run_one(session, ["export", "-"])
    with pytest.raises(UsageError, match="--json"):
        run_one(session, ["export", "-f", "dot", "-", "--json"])


def test_dot_highlights_unsync_paths_shared_and_dimmed_roots() -> None:
    g = nx.DiGraph(index=0, kvm="0x1", pid=1, mmu="shadow", mmu_valid_gen=1)
    base = {"gfn": "0x1", "level": 1, "direct": False, "unsync": False, "invalid": False,
            "obsolete": False, "orphan": False, "unsync_children": 0, "root_count": 0,
            "root": False, "holders": []}
    g.add_node("0xa", **{**base, "level": 2, "root": True, "unsync_children": 1,
                         "holders": ["vcpu0.root", "vcpu1.root"]})
    g.add_node("0xb", **{**base, "unsync": True})
    g.add_node("0xc", **base)
    g.add_node("0xd", **{**base, "root": True, "obsolete": True,
                         "holders": ["vcpu0.prev_roots[0]"]})
    g.add_edge("0xa", "0xb", indexes=[0])
    g.add_edge("0xa", "0xc", indexes=[1])
    text = export.to_dot(g, "vm0")
    node = dict(re.findall(r'^\s*"(0x\w+)" \[(.*)\];$', text, re.M))
    assert 'peripheries="2"' in node["0xa"] and "shared: 2 holders" in node["0xa"]
    assert 'fillcolor="orange"' in node["0xb"]
    assert '"0xa" -> "0xb" [label="0", color="red", penwidth="2"]' in text
    assert '"0xa" -> "0xc" [label="1"];' in text  # not on a path to an unsync page
    assert "dashed" in node["0xd"] and 'fillcolor="gray92"' in node["0xd"]
    assert "peripheries" not in node["0xd"]


def test_large_pictures_collapse_to_unsync_paths(session: Session) -> None:
    g = export.plain_graph(session.graph(session.kernel.vms()[0]))
    keep = export.unsync_paths(g) | {n for n, d in g.nodes(data=True) if d["root"]}
    small, note = export.picture_graph(g, limit=len(keep))
    assert set(small.nodes) == keep and len(keep) < len(g)
    assert note.startswith(f"collapsed: {len(keep)} of {len(g)} shadow pages")
    assert export.picture_graph(g)[0] is g  # under the limit: everything
    with pytest.raises(UsageError, match="too many for a picture"):
        export.picture_graph(g, limit=len(keep) - 1)


def test_missing_dot_is_one_clear_error(session: Session, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    with pytest.raises(KvminspectError, match="needs Graphviz's dot program"):
        run_one(session, ["export", str(tmp_path / "g.svg")])
    assert not (tmp_path / "g.svg").exists()
    status = main(["-c", str(Path(__file__).parent / "vmcores" / FIXTURE), "export",
                   str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "apt-get install graphviz" in err


@needs_dot
def test_svg_names_the_unsync_leaves(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "vm.svg"
    run_one(session, ["export", str(path)])  # svg from the extension
    svg = path.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    titles = set(re.findall(r"<title>(0x[0-9a-f]+)</title>", svg))
    leaves = unsync_leaves(session)
    assert leaves and leaves <= titles


@needs_dot
def test_png_to_stdout(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kvminspect", "--sample", "export",
                           "-f", "png", "-"], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"\x89PNG\r\n")
    assert b"to stdout (png)" in done.stderr


def test_readme_picture_is_the_sample() -> None:
    """docs/sample.svg is what 'kvminspect --sample export docs/sample.svg' draws, and the
    README shows it."""
    root = Path(__file__).resolve().parent.parent
    svg = (root / "docs" / "sample.svg").read_text()
    readme = (root / "README.md").read_text()
    assert "docs/sample.svg" in readme
    assert "kvminspect --sample export docs/sample.svg" in readme
    s = Session(open_fixture(FIXTURE))
    assert unsync_leaves(s) <= set(re.findall(r"<title>(0x[0-9a-f]+)</title>", svg))
