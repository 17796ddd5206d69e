"""The command line: global options anywhere, conflicts, help without a target,
exit statuses for scripts (check, piped commands, -e) and shell completion."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvminspect import cli
from kvminspect.cli import main, split_argv, split_commands, with_json
from kvminspect.commands.export import FORMATS
from kvminspect.errors import UsageError
from tests import corrupt
from tests.conftest import VMCORES

CORE = str(VMCORES / "6.1-shadow")
OTHER = str(VMCORES / "6.12-shadow")


def run(argv: list[str], capsys, stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    capsys.readouterr()
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def documents(text: str) -> list[dict]:
    """The JSON documents of a stream, one after another (each ends with a newline)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while text[i:].strip():
        while text[i].isspace():
            i += 1
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    return docs


def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Record which target each run opens (and open it)."""
    seen: list[tuple[str, str | None]] = []
    real = cli.open_source

    def spy(source, symbols):
        seen.append((*source, *symbols))
        return real(source, symbols)

    monkeypatch.setattr(cli, "open_source", spy)
    return seen


# -- global options in any position (issue 11, item 2) --------------------------------


def test_split_argv() -> None:
    g = split_argv(["roots", "-c", "A", "--json", "-s", "D", "--vm=1", "-sE", "--", "-c"])
    assert (g.core, g.symbols, g.vm, g.json, g.words) == (["A"], ["D", "E"], ["1"], True,
                                                          ["roots", "-c"])
    with pytest.raises(UsageError, match="-c needs a value"):
        split_argv(["roots", "-c"])


def test_sample_then_json_before_the_command(capsys) -> None:
    status, out, err = run(["--sample", "--json", "roots"], capsys)
    assert status == 0, err
    assert json.loads(out)["command"] == "roots"


def test_target_after_the_command(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = opened(monkeypatch)
    status, out, err = run(["roots", "-c", CORE, "--json"], capsys)
    assert status == 0, err
    assert seen == [("core", CORE)] and json.loads(out)["command"] == "roots"


def test_vm_after_a_command_without_vm(capsys) -> None:
    status, out, _ = run(["vms", "--vm", "0", "-c", CORE], capsys)
    assert status == 0 and "*0" in out  # vms marks the selected VM


def test_vmcore_symbols_after_path(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """'vmcore CORE -s DIR': -s is not dropped (the core alone has no debug info)."""
    core = str(next(Path(CORE).glob("vmcore*")))
    status, _, err = run(["vmcore", core], capsys, stdin="vms\n", monkeypatch=monkeypatch)
    assert status == 1 and "give it with -s" in err
    status, out, err = run(["vmcore", core, "-s", CORE], capsys, stdin="vms\n",
                           monkeypatch=monkeypatch)
    assert status == 0, err
    assert "vmm" in out


def test_core_then_vmcore_opens_the_core(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = opened(monkeypatch)
    status, _, err = run(["-c", OTHER, "vmcore"], capsys, stdin="vms\n",
                         monkeypatch=monkeypatch)
    assert status == 0 and seen == [("core", OTHER)]
    assert "6.12" in err  # the banner names the release
    status, _, _ = run(["vmcore", "--sample"], capsys, stdin="", monkeypatch=monkeypatch)
    assert status == 0 and seen[-1] == ("sample", None)


@pytest.mark.parametrize("argv, message", [
    (["-c", CORE, "--sample", "roots"], f"conflicting targets: -c {CORE} and --sample"),
    (["roots", "--sample", "-c", CORE], f"conflicting targets: -c {CORE} and --sample"),
    (["vmcore", CORE, "-c", OTHER], f"conflicting targets: vmcore {CORE} and -c {OTHER}"),
    (["--live", "-c", CORE, "vms"], f"conflicting targets: -c {CORE} and --live"),
    (["-c", CORE, "-c", OTHER, "vms"], f"conflicting options: -c {CORE} and -c {OTHER}"),
    (["live", "--sample"], "conflicting targets: live and --sample"),
    (["vmcore", "--live"], "conflicting targets: vmcore and --live"),
    (["--vm", "0", "-c", CORE, "roots", "--vm", "1"], "conflicting options: --vm 0 and --vm 1"),
    (["vmcore", CORE, OTHER], "vmcore takes one PATH"),
    (["-c", CORE, "--no-such-option", "vms"], "unknown option --no-such-option"),
    (["-c", CORE, "-e", "vms", "roots"], "-e runs its own commands"),
])
def test_conflicts_are_one_line_errors(argv: list[str], message: str,
                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = opened(monkeypatch)
    status, out, err = run(argv, capsys)
    assert status == 2 and out == "" and seen == []
    assert err.startswith(f"kvminspect: error: {message}") and err.count("\n") == 1, err


def test_same_target_twice_is_no_conflict(capsys) -> None:
    status, _, err = run(["-c", CORE, "vms", "-c", CORE, "--vm", "0", "--vm", "0"], capsys)
    assert status == 0, err


# -- help needs no target and reads no kernel (item 4) ---------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["help"], "\n  roots    "),
    (["help", "roots"], "usage: roots ["),
    (["roots", "--help"], "usage: roots ["),
    (["roots", "-h"], "usage: roots ["),
    (["--help"], "usage: kvminspect"),
    (["-h"], "usage: kvminspect"),
    (["-c", "/no/such/core", "help", "roots"], "usage: roots"),
])
def test_help_needs_no_target(argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                              capsys) -> None:
    def no(*a, **k):
        raise AssertionError("help opened a target")

    monkeypatch.setattr(cli, "open_source", no)
    status, out, err = run(argv, capsys)
    assert status == 0 and err == ""
    assert needle in out


def test_help_in_a_subprocess_without_target() -> None:
    for argv in (["help"], ["help", "roots"], ["roots", "--help"], ["--help"]):
        r = subprocess.run([sys.executable, "-m", "kvminspect", *argv], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "" and "roots" in r.stdout, (argv, r.stderr)


# -- scripts: exit statuses and -e (item 6) ---------------------------------------------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> str:
    """A copy of 6.1-shadow whose root's level-3 page claims level 0: check errors."""
    out = tmp_path_factory.mktemp("level-zero")
    corrupt.make("6.1-shadow", "level-zero", out)
    return str(out)


def test_check_exit_status(damaged: str, capsys) -> None:
    status, out, _ = run(["-c", damaged, "check", "--json"], capsys)
    assert status == 3 and json.loads(out)["vms"][0]["summary"]["error"] > 0
    status, out, _ = run(["-c", damaged, "check"], capsys)
    assert status == 3 and " errors, " in out
    status, _, _ = run(["-c", CORE, "check"], capsys)
    assert status == 0
    status, _, _ = run(["-c", damaged, "vms"], capsys)
    assert status == 0  # only check says so


def test_piped_commands_exit_status(damaged: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys) -> None:
    status, out, _ = run(["vmcore", CORE], capsys, stdin="vms\nroots\n", monkeypatch=monkeypatch)
    assert status == 0 and "vmm" in out
    status, out, err = run(["vmcore", CORE], capsys, stdin="vms\nbogus\nroots\n",
                           monkeypatch=monkeypatch)
    assert status == 2 and "unknown command 'bogus'" in err
    assert "vmm" in out and "prev_roots[0]" in out  # vms, then roots still ran
    status, _, _ = run(["vmcore", CORE], capsys, stdin="sp 0x1234\nquit\n",
                       monkeypatch=monkeypatch)
    assert status == 1
    status, _, _ = run(["vmcore", damaged], capsys, stdin="check\n", monkeypatch=monkeypatch)
    assert status == 3


def test_split_commands() -> None:
    assert split_commands("roots; check --json;; ") == ["roots", "check --json"]
    assert split_commands("roots | grep ';' ; vms") == ["roots | grep ';'", "vms"]
    assert with_json("roots --vm 0 | head") == "roots --json --vm 0 | head"
    assert with_json("check --json") == "check --json"
    assert with_json("vms") == "vms --json"


def test_exec_several_commands_one_load(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = opened(monkeypatch)
    status, out, err = run(["-c", CORE, "-e", "roots; check", "--json", "-e", "vms"], capsys)
    assert status == 0, err
    assert [d["command"] for d in documents(out)] == ["roots", "check", "vms"]
    assert seen == [("core", CORE)]
    assert out.endswith("}\n") and "}\n{" in out  # newline separated


def test_exec_text_and_failures(damaged: str, capsys) -> None:
    status, out, err = run(["--sample", "-e", "vms; sp 0x1234; roots"], capsys)
    assert status == 1
    assert err.count("kvminspect: error:") == 1 and "vmm" in out and "prev_roots[0]" in out
    status, _, _ = run(["-e", "check", "-c", damaged], capsys)
    assert status == 3
    status, _, err = run(["-e", "vms"], capsys)
    assert status == 2 and "-e needs a target" in err
    status, out, err = run(["vmcore", CORE, "-e", "vms --json"], capsys)
    assert status == 0 and documents(out)[0]["command"] == "vms" and "kvminspect on" not in err


# -- shell completion --------------------------------------------------------------------


def completion(shell: str, capsys) -> str:
    status, out, err = run(["--completion", shell], capsys)
    assert status == 0 and err == ""
    return out


def bash_complete(script: Path, *words: str) -> list[str]:
    """COMPREPLY of the bash script for the command line *words* (the last one is
    the word being completed)."""
    code = (f'source {script}; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _kvminspect; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", code, "_", "kvminspect", *words], capture_output=True,
                       text=True, timeout=30, check=True)
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion(tmp_path: Path, capsys) -> None:
    script = tmp_path / "kvminspect.bash"
    script.write_text(completion("bash", capsys))
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "complete -o filenames -F _kvminspect kvminspect" in script.read_text()
    names = bash_complete(script, "")
    assert {"vms", "roots", "tree", "check", "help", "live", "vmcore"} <= set(names)
    assert bash_complete(script, "ro") == ["roots"]
    assert bash_complete(script, "--sa") == ["--sample"]
    assert bash_complete(script, "-c", "CORE", "tree", "--de") == ["--depth"]
    opts = bash_complete(script, "roots", "--")
    assert "--json" in opts and "--vm" in opts and "--core" in opts
    assert len(opts) == len(set(opts))
    opts = bash_complete(script, "--sample", "roots", "--")  # a target given: none offered
    assert "--json" in opts and "--vm" in opts and "--core" not in opts
    assert bash_complete(script, "--sample", "export", "--format", "") == list(FORMATS)
    assert bash_complete(script, "help", "tr") == ["tree"]
    (tmp_path / "vmcore.xz").write_text("")
    assert bash_complete(script, "-c", str(tmp_path / "vmc")) == [str(tmp_path / "vmcore.xz")]
    assert bash_complete(script, "roots", "-s", str(tmp_path / "vmc")) == [
        str(tmp_path / "vmcore.xz")]
    assert bash_complete(script, "vmcore", str(tmp_path / "vmc")) == [
        str(tmp_path / "vmcore.xz")]
    assert bash_complete(script, "--sample", "tree", "--depth", "") == []


def test_zsh_completion(tmp_path: Path, capsys) -> None:
    text = completion("zsh", capsys)
    assert text.startswith("#compdef kvminspect\n")
    assert "compdef _kvminspect kvminspect" in text
    for name in ("vms", "roots", "tree", "check", "live", "vmcore"):
        assert f"\n    '{name}:" in text
    assert "    tree) opts=(--depth --unsync-only " in text
    assert f"export:--format) compadd -- {' '.join(FORMATS)};" in text
    assert text.count("{") == text.count("}")
    lines = [line.strip() for line in text.splitlines()]
    for opening, closing in (("case ", "esac"), ("if ", "fi"), ("for ", "done")):
        assert (sum(line.startswith(opening) for line in lines)
                == sum(bool(re.match(rf"(.*; )?{closing}\b", line)) for line in lines)), opening
    if shutil.which("zsh"):
        script = tmp_path / "_kvminspect"
        script.write_text(text)
        subprocess.run(["zsh", "-n", str(script)], check=True)


def test_completion_needs_a_shell(capsys) -> None:
    status, _, err = run(["--completion", "fish"], capsys)
    assert status == 2 and err == "kvminspect: error: --completion takes bash or zsh, not 'fish'\n"


# -- --vm by name: kvm->stats_id and QEMU's -name ---------------------------------------


@pytest.mark.parametrize("argv, name", [
    (["qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-m", "2G"], "web1"),
    (["qemu-system-x86_64", "-name", "web1"], "web1"),
    (["qemu-system-x86_64", "-name", "web1,process=qemu:web1"], "web1"),
    (["qemu-system-x86_64", "-name", "process=p,guest=db"], "db"),
    (["qemu-system-x86_64", "--name", "guest=a,,b"], "a,b"),
    (["qemu-system-x86_64", "-name", "a", "-name", "guest=b"], "b"),  # the last one wins
    (["qemu-system-x86_64", "-name", "process=p"], None),
    (["qemu-system-x86_64", "-m", "2G"], None),
    (["qemu-system-x86_64", "-name"], None),
    ([], None),
])
def test_qemu_guest_name(argv: list[str], name: str | None) -> None:
    from kvminspect.read_vms import qemu_guest_name

    assert qemu_guest_name(argv) == name


def test_vm_names_on_fixtures() -> None:
    from tests.conftest import ALL, open_fixture, truth

    for fixture in ALL:
        if truth(fixture).get("special"):
            continue
        k = open_fixture(fixture).kernel
        has = _has_stats_id(k.prog)
        for vm in k.vms():
            # our VMM is not QEMU; the real-guest fixture's is, started with -name guest=
            assert vm.guest_name == truth(fixture).get("guest_name"), fixture
            assert vm.stats_id == (f"kvm-{vm.pid}" if has else None), fixture
        assert has == (not fixture.startswith("5.10")), fixture


def _has_stats_id(prog) -> bool:
    from kvminspect.layout import has_member

    return has_member(prog.type("struct kvm"), "stats_id")


def test_vm_by_name(capsys) -> None:
    status, out, err = run(["-c", CORE, "--vm", "kvm-97", "roots", "--json"], capsys)
    assert status == 0, err
    assert [v["pid"] for v in json.loads(out)["vms"]] == [97]
    status, out, _ = run(["-c", CORE, "vms", "--json"], capsys)
    (vm,) = json.loads(out)["vms"]
    assert (vm["stats_id"], vm["guest_name"]) == ("kvm-97", None)
    status, out, _ = run(["-c", CORE, "vms"], capsys)
    assert " NAME " in out.splitlines()[0] and " kvm-97 " in out
    status, _, err = run(["-c", CORE, "--vm", "web1", "roots"], capsys)
    assert status == 1 and err.startswith("kvminspect: error: no VM 'web1'")
    assert err.count("\n") == 1
    two = str(VMCORES / "6.1-shadow-2vm")
    status, _, err = run(["-c", two, "roots", "--vm", "kvm-98"], capsys)
    assert status == 1 and err == ("kvminspect: error: VM name 'kvm-98' is ambiguous: VMs 0, 1 "
                                   "(use the index)\n")
    status, out, _ = run(["-c", str(VMCORES / "5.10-shadow"), "vms", "--json"], capsys)
    assert json.loads(out)["vms"][0]["stats_id"] is None  # 5.10 has no kvm->stats_id


def test_guest_name_selects(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A VM whose owner is QEMU started with -name guest=web1 (the command line
    made up: the fixtures' VMM is not QEMU) is --vm web1 and shown by vms."""
    import drgn.helpers.linux.mm

    argv = [b"qemu-system-x86_64", b"-name", b"guest=web1,debug-threads=on"]
    monkeypatch.setattr(drgn.helpers.linux.mm, "cmdline", lambda task: argv)
    core = str(VMCORES / "6.12-shadow")  # not the cached fixture target: read anew
    status, out, err = run(["-c", core, "--vm", "web1", "vms", "--json"], capsys)
    assert status == 0, err
    (vm,) = json.loads(out)["vms"]
    assert vm["guest_name"] == "web1" and vm["stats_id"].startswith("kvm-")
    status, out, _ = run(["-c", core, "vms"], capsys)
    assert f"web1 ({vm['stats_id']})" in out
