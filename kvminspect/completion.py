"""Shell completion scripts for bash and zsh (kvminspect --completion SHELL).

Made from the command registry (kvminspect.registry: each command's argparse
options, without importing the commands) and the table of global options
(kvminspect.options), so a new command or option completes without editing
this file: command names (and the live / vmcore REPLs), each command's
options, the global options, the choices of an option that has them (export
--format, --completion), files after the global options that take a file
(-c, -s, --qemu) and for the file arguments (vmcore PATH, diff B, export
FILE), and command names after help.
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
FILE_ARGS = ("vmcore", "diff", "diagnose", "export")  # commands whose positional argument is a file


def commands() -> dict[str, dict[str, Any]]:
    """Every command: its description, options (option -> choices, [] for a value,
    None for a flag)."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(registry.entries().items()):
        choices = entry.choices()
        opts = {o: choices.get(o, []) if value else None
                for o, value in entry.options().items() if o not in registry.HELP_FLAGS}
        out[name] = {"description": entry.description(), "options": opts}
    return out


def _global_cases(indent: str, files: str, choices: str) -> str:
    """The shell's case arms after a global option: files, its choices, or nothing."""
    arms = [f"{indent}{_case(list(FILE_OPTIONS))}) {files}; return ;;"]
    arms += [f"{indent}{o}) {choices.format(' '.join(c))}; return ;;"
             for o, c in GLOBAL_CHOICES.items()]
    arms.append(f"{indent}{_case(list(GLOBAL_OTHER_VALUES))}) return ;;")
    return "\n".join(arms)


def _with_globals(options: dict[str, Any]) -> str:
    """A command's options, then the global ones it does not have itself."""
    return " ".join([*options, *(g for g in GLOBALS if g not in options)])


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
    local cur prev cmd="" i w opts
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
    case "$prev" in
{_global_cases("        ", 'COMPREPLY=($(compgen -f -- "$cur"))',
               'COMPREPLY=($(compgen -W "{}" -- "$cur"))')}
    esac
    case "$cmd:$prev" in
{choice_cases}
    esac
    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "$globals" -- "$cur"))
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
        {_case(value_opts) or "--no-such-option"}) return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
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
    return f"""#compdef kvminspect
# zsh completion for kvminspect (kvminspect --completion zsh)
_kvminspect() {{
  local -a commands globals opts
  local cmd="" i w cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}"
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
  case "$prev" in
{_global_cases("    ", "_files", "compadd -- {}")}
  esac
  case "$cmd:$prev" in
{choice_cases}
  esac
  if [[ -z "$cmd" ]]; then
    if [[ "$cur" == -* ]]; then
      compadd -- $globals
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
    compadd -- $opts
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
