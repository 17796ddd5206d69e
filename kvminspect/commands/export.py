"""export: write one VM's shadow-page graph as DOT, GraphML or node-link JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import networkx as nx
from drgn import Program
from drgn.commands import argument

from kvminspect.commands import finish, kvm_command, session_of
from kvminspect.errors import KvminspectError, LookupFailed, UsageError
from kvminspect.graph import VMGraph
from kvminspect.model import VM
from kvminspect.render import console, dumps
from kvminspect.session import Session
from kvminspect.shapes import sp_json, vm_json, vm_ref

FORMATS = ("dot", "graphml", "json")


def node_attrs(g: VMGraph, addr: int) -> dict[str, Any]:
    """One struct kvm_mmu_page (shapes.sp_json) as plain attributes: holders as names."""
    d = sp_json(g.sp(addr), g)
    return {**d, "addr": d.pop("sp"), "root": addr in g.roots,
            "holders": [h["holder"] for h in d["holders"]]}


def plain_graph(g: VMGraph) -> nx.DiGraph:
    """The VMGraph with "0x…" node ids and JSON-able attributes (SPTE indexes on edges)."""
    out = nx.DiGraph()
    for sp in g.pages():  # roots first, then by level and gfn
        out.add_node(hex(sp.addr), **node_attrs(g, sp.addr))
    for a, b, indexes in g.edges():
        out.add_edge(hex(a), hex(b), indexes=sorted(indexes))
    return out


def graph_info(vm: VM) -> dict[str, Any]:
    """Graph-level attributes: which VM this is (shapes.vm_ref)."""
    return {k: v for k, v in vm_ref(vm).items() if v is not None}


def dot_quote(text: str) -> str:
    """A DOT double-quoted string: backslashes, quotes and newlines escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(node: str, d: dict[str, Any]) -> str:
    """One node statement: label, and colours for roots, unsync and obsolete pages."""
    lines = [node, f"gfn {d['gfn']} L{d['level']}"]
    flags = [k for k in ("direct", "unsync", "invalid", "obsolete", "orphan") if d[k]]
    if d["unsync_children"]:
        flags.append(f"unsync_children={d['unsync_children']}")
    if d["root_count"]:
        flags.append(f"root_count={d['root_count']}")
    if flags:
        lines.append(" ".join(flags))
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
    if d["obsolete"] or d["orphan"]:
        style.append("dashed")
        attrs["fontcolor"] = "gray40"
    if style:
        attrs["style"] = ",".join(style)
    body = ", ".join(f"{k}={dot_quote(v)}" for k, v in attrs.items())
    return f"  {dot_quote(node)} [{body}];"


def to_dot(g: nx.DiGraph, name: str) -> str:
    """The graph in Graphviz DOT: roots blue and bold, unsync orange, edges by SPTE index."""
    info = g.graph
    title = (f"VM {info['index']} kvm {info['kvm']} pid {info['pid']} {info['mmu']} "
             f"mmu_valid_gen {info['mmu_valid_gen']}")
    out = [f"digraph {dot_quote(name)} {{",
           f"  graph [label={dot_quote(title)}, labelloc=\"t\", rankdir=\"TB\"];",
           '  node [shape="box", fontname="monospace", fontsize="10"];',
           '  edge [fontname="monospace", fontsize="9"];']
    out.extend(_dot_node(n, d) for n, d in g.nodes(data=True))
    for a, b, d in g.edges(data=True):
        label = ",".join(map(str, d["indexes"]))
        out.append(f"  {dot_quote(a)} -> {dot_quote(b)} [label={dot_quote(label)}];")
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


def to_json(g: nx.DiGraph, vm: VM) -> dict[str, Any]:
    """networkx node-link data (nodes / edges) plus the VM (as the vms command shows it)."""
    try:
        data = nx.node_link_data(g, edges="edges")  # networkx 3.4+
    except TypeError:
        data = nx.node_link_data(g, link="edges")
    return {"vm": vm_json(vm), **data}


def write(g: nx.DiGraph, vm: VM, fmt: str, path: Path) -> None:
    """Write *g* to *path* in *fmt*."""
    if fmt == "dot":
        path.write_text(to_dot(g, f"vm{vm.index}"))
    elif fmt == "graphml":
        nx.write_graphml(to_graphml_graph(g), path)
    else:
        path.write_text(dumps(to_json(g, vm)) + "\n")


def one_vm(s: Session, ident: str | None) -> VM:
    """The VM to export: --vm, the selected VM, or the only one."""
    vms = s.vms(ident)
    if not vms:
        raise LookupFailed("no VMs (vm_list is empty): nothing to export")
    if len(vms) > 1:
        raise UsageError(f"{len(vms)} VMs: choose one with --vm ID (or select it with 'vm ID')")
    return vms[0]


@kvm_command(
    argument("--format", "-f", choices=FORMATS, required=True, help="output format"),
    argument("file", metavar="FILE", help="file to write (replaced if it exists)"),
)
def _cmd_export(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """write one VM's shadow-page graph as DOT, GraphML or JSON

    Nodes are struct kvm_mmu_page (id: the address as 0x…) with addr, gfn, level,
    direct, tdp_mmu_page, unsync, unsync_children, root_count, invalid, obsolete,
    orphan, root and holders (who holds it as a root); edges parent -> child carry the
    spt[] indexes. One VM per file: --vm ID, else the selected VM, else the only VM
    (with several VMs, run it once per VM). dot: Graphviz, roots blue, unsync pages
    orange, pages with unsync children yellow, obsolete/orphan dashed. graphml: lists as
    comma-separated strings. json: networkx node-link data (nodes, edges) plus the VM.
    """
    s = session_of(kwargs)
    vm = one_vm(s, args.vm)
    g = plain_graph(s.graph(vm))
    g.graph.update(graph_info(vm))
    path = Path(args.file)
    try:
        write(g, vm, args.format, path)
    except OSError as e:
        raise KvminspectError(f"cannot write {path}: {e.strerror or e}") from None
    n, m = g.number_of_nodes(), g.number_of_edges()

    def human() -> None:
        console().print(f"wrote {n} shadow pages and {m} edges of VM {vm.index} "
                        f"(kvm {vm.addr:#x}) to {path} ({args.format})", markup=False)

    doc = {"vms": [{**vm_ref(vm), "file": str(path), "format": args.format, "nodes": n,
                    "edges": m}]}
    finish(s, args, "export", doc, human, [vm])
