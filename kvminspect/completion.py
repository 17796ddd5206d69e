"""Shell completion scripts for bash and zsh (kvminspect --completion SHELL).

Made from the command registry (kvminspect.registry: each command's argparse
options, without importing the commands) and the table of global options
(kvminspect.options), so a new command or option completes without editing
this file: command names (and the live / vmcore REPLs), each command's
options, the global options, the choices of an option that has them (export
--format, --completion), files after the global options that take a file
(-c, -s, --qemu) and for the file arguments (vmcore PATH, diff B, export
FILE), and command names after help.

An option once given is not offered again, nor those it rules out: a target
(-c, --live, --qemu, --sample) rules out every target, an option of a mutually
exclusive group its group (walk --vcpu: --root); -s and -e may be repeated.
Where a value is a number or a name only the target knows (walk --vcpu N,
--vm ID, tree --depth N) nothing is offered: bash offers nothing (no file
names), zsh says what the value is.
"""

from __future__ import annotations

from typing import Any

from kvminspect import options, registry

# global options (kvminspect.options), those that take a value, and those whose value is a file
GLOBALS = tuple(options.spellings())
GLOBAL_VALUES = tuple(options.value_flags())
FILE_OPTIONS = tuple(options.file_flags())
# global options that take a value with choices (--completion bash|zsh), and the others
GLOBAL_CHOICES = {f: o.choices for o in options.OPTIONS if o.choices for f in o.flags}
GLOBAL_OTHER_VALUES = tuple(f for f in GLOBAL_VALUES
                            if f not in FILE_OPTIONS and f not in GLOBAL_CHOICES)
REPLS = {"live": "REPL on the running kernel (or --qemu SOCK)",
         "vmcore": "REPL on a vmcore (no PATH: the bundled sample)"}
FILE_ARGS = ("vmcore", "diff", "diagnose", "export", "guest-core")  # a file positional
# global options once given -> the global options not to offer again: any target rules
# out every target; -s and -e may be repeated
TARGETS = tuple(f for o in options.targets() for f in o.flags)
GLOBAL_EXCLUDES = {f: list(TARGETS) if o.target else [] if o.repeat else list(o.flags)
                   for o in options.OPTIONS for f in o.flags}
# after a command: no --version (before it only) nor --completion (no command)
AFTER_COMMAND = tuple(f for o in options.OPTIONS if not (o.first and o.dest == "version")
                      and o.dest != "completion" for f in o.flags)


def commands() -> dict[str, dict[str, Any]]:
    """Every command: its description, options (option -> choices, [] for a value,
    None for a flag)."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(registry.entries().items()):
        choices = entry.choices()
        opts = {o: choices.get(o, []) if value else None
                for o, value in entry.options().items() if o not in registry.HELP_FLAGS}
        out[name] = {"description": entry.description(), "options": opts,
                     "excludes": entry.excludes(), "values": entry.values()}
    return out


def _exclude_cases(cmds: dict[str, dict[str, Any]], indent: str) -> str:
    """Case arms on "$cmd:$w" (a word given before the cursor) that add to $drop the
    options not to offer again (GLOBAL_EXCLUDES, each command's excludes())."""
    arms: dict[str, list[str]] = {}
    for name, c in cmds.items():
        for o, ruled in c["excludes"].items():
            arms.setdefault(" ".join(ruled), []).append(f"{name}:{o}")
    for o, ruled in GLOBAL_EXCLUDES.items():
        arms.setdefault(" ".join(ruled), []).append(f"*:{o}")
    return "\n".join(f'{indent}{_case(words)}) drop+="{ruled} " ;;'
                     for ruled, words in arms.items() if ruled)


def _global_cases(indent: str, files: str, choices: str, say: bool = False) -> str:
    """The shell's case arms after a global option: files, its choices, or nothing
    (*say*: zsh's _message of what the value is)."""
    arms = [f"{indent}{_case(list(FILE_OPTIONS))}) {files}; return ;;"]
    arms += [f"{indent}{o}) {choices.format(' '.join(c))}; return ;;"
             for o, c in GLOBAL_CHOICES.items()]
    if say:
        by_flag = options.by_flag()
        arms += [f"{indent}{o}) _message {_zsh_message(f'{by_flag[o].metavar}: {by_flag[o].help}')}"
                 "; return ;;" for o in GLOBAL_OTHER_VALUES]
    else:
        arms.append(f"{indent}{_case(list(GLOBAL_OTHER_VALUES))}) return ;;")
    return "\n".join(arms)


def _with_globals(options: dict[str, Any]) -> str:
    """A command's options, then the global ones it does not have itself (those that
    go after a command)."""
    return " ".join([*options, *(g for g in AFTER_COMMAND if g not in options)])


def _case(items: list[str]) -> str:
    return "|".join(items)


def bash() -> str:
    """The bash script: `eval "$(kvminspect --completion bash)"`."""
    cmds = commands()
    opt_cases = "\n".join(
        f"        {name}) opts=\"{_with_globals(c['options'])}\" ;;" for name, c in cmds.items())
    value_opts = sorted({o for c in cmds.values() for o, v in c["options"].items()
                         if v is not None})
    choice_cases = "\n".join(
        f"        {name}:{o}) COMPREPLY=($(compgen -W \"{' '.join(v)}\" -- \"$cur\")); "
        "return ;;"
        for name, c in cmds.items() for o, v in c["options"].items() if v)
    return f"""# bash completion for kvminspect (kvminspect --completion bash)
_kvminspect() {{
    local cur prev cmd="" i w o opts drop=" " keep=()
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local globals="{' '.join(GLOBALS)}"
    local commands="{' '.join([*cmds, *REPLS])}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in
            {_case(list(GLOBAL_VALUES))}) ((i++)) ;;
            -*) ;;
            *) cmd="$w"; break ;;
        esac
    done
    # options given already, and those they rule out, are not offered again
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]%%=*}}"
        case "$cmd:$w" in
{_exclude_cases(cmds, "            ")}
        esac
    done
    case "$prev" in
{_global_cases("        ", 'COMPREPLY=($(compgen -f -- "$cur"))',
               'COMPREPLY=($(compgen -W "{}" -- "$cur"))')}
    esac
    case "$cmd:$prev" in
{choice_cases}
    esac
    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            for o in $globals; do [[ "$drop" == *" $o "* ]] || keep+=("$o"); done
            COMPREPLY=($(compgen -W "${{keep[*]}}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi
    opts="$globals"
    case "$cmd" in
{opt_cases}
    esac
    case "$prev" in
        {_case(value_opts) or "--no-such-option"}) return ;;  # a number or name: nothing
    esac
    if [[ "$cur" == -* ]]; then
        for o in $opts; do [[ "$drop" == *" $o "* ]] || keep+=("$o"); done
        COMPREPLY=($(compgen -W "${{keep[*]}}" -- "$cur"))
    elif [[ "$cmd" == help ]]; then
        COMPREPLY=($(compgen -W "{' '.join(cmds)}" -- "$cur"))
    else
        case "$cmd" in
            {_case(list(FILE_ARGS))}) COMPREPLY=($(compgen -f -- "$cur")) ;;
        esac
    fi
}}
complete -o filenames -F _kvminspect kvminspect
"""


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''").replace(":", "\\:") + "'"


def _zsh_message(text: str) -> str:
    """*text* quoted for _message (a colon is no separator there)."""
    return "'" + text.replace("'", "'\\''") + "'"


def zsh() -> str:
    """The zsh script: saved as _kvminspect on $fpath, or `eval` after compinit."""
    cmds = commands()
    described = "\n".join(f"    '{n}:{_zsh_quote(c['description'])[1:]}"
                          for n, c in cmds.items())
    described += "\n" + "\n".join(f"    '{n}:{d}'" for n, d in REPLS.items())
    opt_cases = "\n".join(f"    {name}) opts=({_with_globals(c['options'])}) ;;"
                          for name, c in cmds.items())
    choice_cases = "\n".join(f"    {name}:{o}) compadd -- {' '.join(v)}; return ;;"
                             for name, c in cmds.items() for o, v in c["options"].items() if v)
    value_opts = sorted({o for c in cmds.values() for o, v in c["options"].items()
                         if v is not None})
    messages = "\n".join(f"    {name}:{o}) _message {_zsh_message(text)}; return ;;"
                         for name, c in cmds.items() for o, text in c["values"].items()
                         if not c["options"].get(o) and o not in GLOBAL_VALUES)
    return f"""#compdef kvminspect
# zsh completion for kvminspect (kvminspect --completion zsh)
_kvminspect() {{
  local -a commands globals opts keep
  local cmd="" i w o drop=" " cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}"
  commands=(
{described}
  )
  globals=({' '.join(GLOBALS)})
  for ((i = 2; i < CURRENT; i++)); do
    w="${{words[i]}}"
    case "$w" in
      {_case(list(GLOBAL_VALUES))}) ((i++)) ;;
      -*) ;;
      *) cmd="$w"; break ;;
    esac
  done
  # options given already, and those they rule out, are not offered again
  for ((i = 2; i < CURRENT; i++)); do
    w="${{words[i]%%=*}}"
    case "$cmd:$w" in
{_exclude_cases(cmds, "      ")}
    esac
  done
  case "$prev" in
{_global_cases("    ", "_files", "compadd -- {}", say=True)}
  esac
  case "$cmd:$prev" in
{choice_cases}
{messages}
  esac
  if [[ -z "$cmd" ]]; then
    if [[ "$cur" == -* ]]; then
      for o in $globals; do [[ "$drop" == *" $o "* ]] || keep+=($o); done
      compadd -- $keep
    else
      _describe -t commands 'kvminspect command' commands
    fi
    return
  fi
  opts=($globals)
  case "$cmd" in
{opt_cases}
  esac
  case "$prev" in
    {_case(value_opts) or "--no-such-option"}) return ;;
  esac
  if [[ "$cur" == -* ]]; then
    for o in $opts; do [[ "$drop" == *" $o "* ]] || keep+=($o); done
    compadd -- $keep
  elif [[ "$cmd" == help ]]; then
    compadd -- {' '.join(cmds)}
  else
    case "$cmd" in
      {_case(list(FILE_ARGS))}) _files ;;
    esac
  fi
}}
if [[ "${{zsh_eval_context[-1]}}" == loadautofunc ]]; then
  _kvminspect "$@"
else
  compdef _kvminspect kvminspect
fi
"""


def script(shell: str) -> str:
    """The completion script of *shell* (bash or zsh)."""
    return {"bash": bash, "zsh": zsh}[shell]()
