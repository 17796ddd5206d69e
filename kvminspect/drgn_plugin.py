"""The drgn plugin: kvminspect's commands inside drgn's own CLI, as ``%kvm CMD ARGS``.

Installing kvminspect registers this module in the ``drgn.plugins`` entry point
group (pyproject.toml). drgn imports it when a program is set up; importing it
registers one raw command, ``kvm``, in drgn's default namespace. ``%kvm roots``
then runs kvminspect's ``roots`` on the program the user already has, printing
what ``kvminspect -c CORE roots`` prints; ``%kvm`` alone lists the commands.
The session (selected VM, built graphs) is kept in ``prog.config`` for the next
``%kvm`` on the same program.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import drgn
from drgn.commands.linux import linux_kernel_raw_command

from kvminspect.errors import DebugInfoError, KvmNotFound

if TYPE_CHECKING:  # imported when %kvm runs: drgn imports this module at every start
    from kvminspect.session import Session
    from kvminspect.target import Target

SESSION_KEY = "kvminspect_session"


def check_kvm_debug_info(prog: drgn.Program) -> None:
    """The kvm module (struct module "kvm") is loaded and drgn has its debug info;
    else one clear line (drgn loads debug info as the user asked, kvminspect does not)."""
    from kvminspect.target import KVM_MODULES

    kvm = next((m for m, _ in prog.loaded_modules() if m.name in KVM_MODULES), None)
    if kvm is None:
        raise KvmNotFound("this kernel has no kvm module loaded")
    if kvm.wants_debug_file():
        raise DebugInfoError("drgn has no debug info for kvm.ko: give it to drgn "
                             "(drgn -s vmlinux -s kvm.ko ...)")


def target_of(prog: drgn.Program) -> Target:
    """A kvminspect Target over a Program drgn opened: release from UTS_RELEASE,
    live when drgn reads a running kernel (/proc/kcore or QEMU)."""
    from kvminspect.layout import kernel_release
    from kvminspect.target import Target

    live = bool(prog.flags & drgn.ProgramFlags.IS_LIVE)
    name = "live" if live else "drgn"
    return Target(prog, name, kernel_release(prog), live=live)


def session_of_prog(prog: drgn.Program) -> Session:
    """The kvminspect Session kept on *prog* (made on the first %kvm)."""
    from kvminspect.session import Session

    s = prog.config.get(SESSION_KEY)
    if not isinstance(s, Session) or s.target.prog is not prog:
        check_kvm_debug_info(prog)
        s = Session(target_of(prog))
        prog.config[SESSION_KEY] = s
    return s


def run_kvm(prog: drgn.Program, line: str, outer: dict[str, Any] | None = None) -> None:
    """Run one kvminspect command line (``roots --vm 0 | grep vcpu``) on *prog*.

    *outer*: the globals of drgn's shell the line was typed in (``%kvm guest py``
    binds the guest's program there). Errors are raised (drgn's REPL prints them as
    one line, run_command raises).
    """
    from kvminspect.commands import NAMESPACE
    from kvminspect.repl import rewrite

    text = line.strip() or "help"
    session = session_of_prog(prog)
    session.begin(progress="--json" not in text.split())
    NAMESPACE.run(prog, rewrite(prog, text),
                  globals={"session": session, "drgn_globals": outer})


@linux_kernel_raw_command(
    name="kvm",
    description="run a kvminspect command (KVM's MMU: VMs, roots, shadow pages)",
    usage="**kvm** [*command* [*args*]]",
    long_description="""
    Run a kvminspect command on this program, as ``kvminspect -c CORE command
    args`` would: ``%kvm roots``, ``%kvm tree --unsync-only``, ``%kvm sp ADDR``,
    with ``| shell`` pipes and ``> file`` redirects. ``%kvm`` or ``%kvm help``
    lists the commands. The selected VM (``%kvm vm 1``) is kept between commands.
    Needs kvm.ko's debug info loaded in drgn.
    """,
)
def _cmd_kvm(prog: drgn.Program, name: str, args: str, **kwargs: Any) -> None:
    """%kvm: one kvminspect command on drgn's program."""
    run_kvm(prog, args, kwargs.get("globals"))
