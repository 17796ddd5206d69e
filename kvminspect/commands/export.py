"""export: write one VM's shadow-page graph as DOT, GraphML, node-link JSON or a picture.

Pictures (SVG, PNG) are the DOT text laid out by Graphviz's ``dot``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import networkx as nx
from drgn import Program
from drgn.commands import argument

from kvminspect.accounting import TdpPages
from kvminspect.commands import finish, kvm_command, session_of
from kvminspect.commands.vms import vm_tdp_pages
from kvminspect.errors import KvminspectError, LookupFailed, UsageError
from kvminspect.fmt import hx
from kvminspect.graph import VMGraph
from kvminspect.model import VM
from kvminspect.render import dumps, plural
from kvminspect.results import Exported, page_view
from kvminspect.session import Session
from kvminspect.shapes import export_node_json, exported_json, vm_json, vm_ref

FORMATS = ("dot", "graphml", "json", "svg", "png")
PICTURES = ("svg", "png")
EXTENSIONS = {".dot": "dot", ".gv": "dot", ".graphml": "graphml", ".json": "json",
              ".svg": "svg", ".png": "png"}
STDOUT = "-"
# dot lays out a few thousand nodes in seconds, 10^5 never: above this, a picture
# keeps only the roots and the paths down to unsync pages
PICTURE_LIMIT = 2000


def node_attrs(g: VMGraph, addr: int) -> dict[str, Any]:
    """One struct kvm_mmu_page as plain attributes (shapes.export_node_json)."""
    return export_node_json(page_view(g.sp(addr), g), addr in g.roots)


def plain_graph(g: VMGraph) -> nx.DiGraph:
    """The VMGraph with "0x…" node ids and JSON-able attributes (SPTE indexes on edges):
    what dot, GraphML and JSON write, and what DOT's and pictures' colours are read from."""
    out = nx.DiGraph()
    for sp in g.pages():  # roots first, then by level and gfn
        out.add_node(hx(sp.addr), **node_attrs(g, sp.addr))
    for a, b, indexes in g.edges():
        out.add_edge(hx(a), hx(b), indexes=sorted(indexes))
    return out


def graph_info(vm: VM) -> dict[str, Any]:
    """Graph-level attributes: which VM this is (shapes.vm_ref)."""
    return {k: v for k, v in vm_ref(vm).items() if v is not None}


def dot_quote(text: str) -> str:
    """A DOT double-quoted string: backslashes, quotes and newlines escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(node: str, d: dict[str, Any], on_path: bool) -> str:
    """One node statement: label, and colours for roots, unsync and obsolete pages.

    Unsync pages are orange, pages above one (*on_path*) have a red border;
    a root with several holders is drawn with a double border ("shared: N holders");
    invalid or obsolete roots (and orphans) are dashed and grey.
    """
    lines = [node, f"gfn {d['gfn']} L{d['level']}"]
    flags = [k for k in ("direct", "unsync", "invalid", "obsolete", "orphan") if d[k]]
    if d["unsync_children"]:
        flags.append(f"unsync_children={d['unsync_children']}")
    if d["root_count"]:
        flags.append(f"root_count={d['root_count']}")
    if flags:
        lines.append(" ".join(flags))
    if len(d["holders"]) > 1:
        lines.append(f"shared: {len(d['holders'])} holders")
    if d["holders"]:
        lines.append(", ".join(d["holders"]))
    attrs = {"label": "\n".join(lines)}
    style = []
    if d["unsync"]:
        style.append("filled")
        attrs["fillcolor"] = "orange"
    elif d["unsync_children"]:
        style.append("filled")
        attrs["fillcolor"] = "lightyellow"
    if d["root"]:
        attrs.update(color="blue", penwidth="3")
        if len(d["holders"]) > 1:
            attrs["peripheries"] = "2"
    elif on_path:
        attrs.update(color="red", penwidth="2")
    if d["invalid"] or d["obsolete"] or d["orphan"]:
        style.append("dashed")
        attrs["fontcolor"] = "gray40"
        if not d["root"]:
            attrs["color"] = "gray60"
        if not d["unsync"] and not d["unsync_children"]:
            style.append("filled")
            attrs["fillcolor"] = "gray92"
    if style:
        attrs["style"] = ",".join(style)
    body = ", ".join(f"{k}={dot_quote(v)}" for k, v in attrs.items())
    return f"  {dot_quote(node)} [{body}];"


def unsync_paths(g: nx.DiGraph) -> set[str]:
    """The unsync pages (struct kvm_mmu_page unsync) and every page above one."""
    unsync = [n for n, d in g.nodes(data=True) if d["unsync"] is True]
    out = set(unsync)
    for n in unsync:
        out |= nx.ancestors(g, n)
    return out


# roots on the left, levels to the right: a level-1 fan-out (hundreds of pages under one
# table) is then tall, not wide. The .dot file says what the pictures draw.
RANKDIR = "LR"


def to_dot(g: nx.DiGraph, name: str, note: str = "") -> str:
    """The graph in Graphviz DOT: roots blue and bold, unsync orange and the paths down
    to them red, edges labelled by SPTE index; *note* ends the title; drawn left to
    right (RANKDIR), as export's pictures are: they are this text laid out by dot."""
    info = g.graph
    title = (f"VM {info['index']} kvm {info['kvm']} pid {info['pid']} {info['mmu']} "
             f"mmu_valid_gen {info['mmu_valid_gen']}" + (f"\n{note}" if note else ""))
    path = unsync_paths(g)
    out = [f"digraph {dot_quote(name)} {{",
           f"  graph [label={dot_quote(title)}, labelloc=\"t\", rankdir={dot_quote(RANKDIR)}];",
           '  node [shape="box", fontname="monospace", fontsize="10"];',
           '  edge [fontname="monospace", fontsize="9"];']
    out.extend(_dot_node(n, d, n in path) for n, d in g.nodes(data=True))
    for a, b, d in g.edges(data=True):
        label = ",".join(map(str, d["indexes"]))
        hot = ', color="red", penwidth="2"' if a in path and b in path else ""
        out.append(f"  {dot_quote(a)} -> {dot_quote(b)} [label={dot_quote(label)}{hot}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_graphml_graph(g: nx.DiGraph) -> nx.DiGraph:
    """A copy GraphML can hold: lists become comma-separated strings."""
    out = nx.DiGraph(**g.graph)
    for n, d in g.nodes(data=True):
        out.add_node(n, **{k: ",".join(v) if isinstance(v, list) else v for k, v in d.items()})
    for a, b, d in g.edges(data=True):
        out.add_edge(a, b, indexes=",".join(map(str, d["indexes"])))
    return out


def to_json(g: nx.DiGraph, vm: VM, tdp: TdpPages | None) -> dict[str, Any]:
    """networkx node-link data (nodes / edges) plus the VM (as the vms command shows it;
    *tdp*: its TDP MMU's pages)."""
    try:
        data = nx.node_link_data(g, edges="edges")  # networkx 3.4+
    except TypeError:
        data = nx.node_link_data(g, link="edges")
    return {"vm": vm_json(vm, tdp), **data}


def picture_graph(g: nx.DiGraph, limit: int = PICTURE_LIMIT) -> tuple[nx.DiGraph, str]:
    """*g*, or (above *limit* pages) only its roots and the paths to unsync pages, with
    a note saying so; UsageError when even that is above the limit."""
    if g.number_of_nodes() <= limit:
        return g, ""
    keep = unsync_paths(g) | {n for n, d in g.nodes(data=True) if d["root"]}
    if len(keep) > limit:
        raise UsageError(f"{g.number_of_nodes()} shadow pages, {len(keep)} of them roots or "
                         f"on paths to unsync pages: too many for a picture (limit {limit}); "
                         "export --format dot, graphml or json instead")
    note = (f"collapsed: {len(keep)} of {g.number_of_nodes()} shadow pages "
            "(roots and the paths to unsync pages)")
    return g.subgraph(keep).copy(), note


def render_picture(dot: str, fmt: str) -> bytes:
    """Graphviz's dot -T*fmt* of *dot*: the SVG or PNG bytes."""
    exe = shutil.which("dot")
    if exe is None:
        raise KvminspectError(f"export --format {fmt} needs Graphviz's dot program "
                              "(Debian: apt-get install graphviz)")
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                              check=False)
    except OSError as e:
        raise KvminspectError(f"cannot run {exe}: {e.strerror or e}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise KvminspectError(f"dot -T{fmt} failed: {why[-1] if why else done.returncode}")
    return done.stdout


def encode(g: nx.DiGraph, vm: VM, fmt: str, tdp: TdpPages | None = None) -> tuple[bytes, str]:
    """*g* in *fmt* as bytes, and a note when a picture was collapsed (*tdp*: the VM's
    TDP MMU pages, for json)."""
    name = f"vm{vm.index}"
    if fmt == "dot":
        return to_dot(g, name).encode(), ""
    if fmt in PICTURES:
        small, note = picture_graph(g)
        return render_picture(to_dot(small, name, note), fmt), note
    if fmt == "graphml":
        buf = io.BytesIO()
        nx.write_graphml(to_graphml_graph(g), buf)
        return buf.getvalue(), ""
    return (dumps(to_json(g, vm, tdp)) + "\n").encode(), ""


def write(g: nx.DiGraph, vm: VM, fmt: str, path: Path | None,
          tdp: TdpPages | None = None) -> str:
    """Write *g* in *fmt* to *path* (None: stdout); the collapse note of a picture."""
    data, note = encode(g, vm, fmt, tdp)
    if path is None:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            sys.stdout.write(data.decode(errors="replace"))
        else:
            out.write(data)
            out.flush()
    else:
        path.write_bytes(data)
    return note


def format_of(fmt: str | None, file: str) -> str:
    """--format, else the format FILE's extension names (UsageError if it names none,
    or names another than --format: 'export --format dot g.svg' would write DOT text
    into a .svg file)."""
    ext = Path(file).suffix.lower()
    if fmt is not None:
        named = EXTENSIONS.get(ext) if file != STDOUT else None
        if named is not None and named != fmt:
            raise UsageError(f"export: --format {fmt} but {file}'s extension says {named}: "
                             f"name it .{fmt}, or leave --format out")
        return fmt
    if file == STDOUT:
        raise UsageError("export to stdout ('-') needs --format (dot, graphml, json, svg, png)")
    if ext not in EXTENSIONS:
        raise UsageError(f"cannot tell the format of {file!r} from its extension: give "
                         "--format (dot, graphml, json, svg, png)")
    return EXTENSIONS[ext]


def one_vm(s: Session, ident: str | None) -> VM:
    """The VM to export: --vm, the selected VM, or the only one."""
    vms = s.vms(ident)
    if not vms:
        raise LookupFailed("no VMs (vm_list is empty): nothing to export")
    if len(vms) > 1:
        raise UsageError(f"{len(vms)} VMs: choose one with --vm ID (or select it with 'vm ID')")
    return vms[0]


@kvm_command(
    argument("--format", "-f", choices=FORMATS,
             help="output format (default: from FILE's extension: .dot .graphml .json .svg .png)"),
    argument("file", metavar="FILE", help="file to write (replaced if it exists); - is stdout"),
)
def _cmd_export(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """write one VM's shadow-page graph as DOT, GraphML, JSON or an SVG/PNG picture

    Nodes are struct kvm_mmu_page (id: the address as 0x…) with addr, gfn, level,
    direct, tdp_mmu_page, unsync, unsync_children, root_count, invalid, obsolete,
    orphan, root and holders (who holds it as a root); edges parent -> child carry the
    spt[] indexes. One VM per file: --vm ID, else the selected VM, else the only VM
    (with several VMs, run it once per VM). FILE - writes to stdout; without --format
    the format is FILE's extension; the status line goes to stderr. dot: Graphviz,
    roots blue (a shared root's border doubled), unsync pages orange and the paths down
    to them red, pages with unsync children yellow, invalid/obsolete/orphan pages dashed
    grey. svg, png: that graph drawn by Graphviz's dot (installed separately); above
    2000 pages only the roots and the paths to unsync pages are drawn. graphml: lists
    as comma-separated strings. json: networkx node-link data (nodes, edges) plus the VM.
    """
    fmt = format_of(args.format, args.file)
    to_stdout = args.file == STDOUT
    if to_stdout and args.json:
        raise UsageError("export - writes the graph to stdout: --json cannot go there too")
    s = session_of(kwargs)
    vm = one_vm(s, args.vm)
    g = plain_graph(s.graph(vm))
    g.graph.update(graph_info(vm))
    path = None if to_stdout else Path(args.file)
    where = "stdout" if path is None else str(path)
    try:
        note = write(g, vm, fmt, path, vm_tdp_pages(s.kernel, vm) if fmt == "json" else None)
    except OSError as e:
        raise KvminspectError(f"cannot write {where}: {e.strerror or e}") from None
    done = Exported(args.file, fmt, g.number_of_nodes(), g.number_of_edges())
    if note:
        print(f"kvminspect: {note}", file=sys.stderr)

    def human() -> None:
        print(f"wrote {plural(done.nodes, 'shadow page', 'shadow pages')} and "
              f"{plural(done.edges, 'edge', 'edges')} of VM {vm.index} "
              f"(kvm {hx(vm.addr)}) to {where} ({done.format})", file=sys.stderr)

    finish(s, args, "export", {"vms": [{**vm_ref(vm), **exported_json(done)}]}, human, [vm])
