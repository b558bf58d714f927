"""Batch scripts for `kiln slurm` (trainers/commands/slurm.py) from the templates in slurm/:
each value quoted for the line it goes on, or refused."""
from __future__ import annotations

import re
import shlex
from importlib import resources


# How the user gave each value that goes on an `#SBATCH` line, for the error naming it.
FLAGS = {"job_name": "--job-name", "time": "--time", "workdir": "the working directory", "run_root": "--run-root"}


def sbatch_word(value: str, what: str) -> str:
    """`value` as one argument of an `#SBATCH` line. sbatch splits those lines itself, not the
    shell: quotes group, a backslash escapes the next character and an unquoted `#` starts a
    comment; nothing can carry a line break, so a control character is refused."""
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError(f"{what} {value!r} cannot go on an #SBATCH line (it holds a newline or other control character)")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    # A line break would end the comment and start a line of script (or stop sbatch reading directives).
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def render(template: str, values: dict[str, object]) -> str:
    """Fills `{{name}}` (as is: numbers and text already quoted), `{{name|sh}}` (one shell word),
    `{{name|sbatch}}` (one `#SBATCH` argument), `{{name|pattern}}` (the same inside a filename
    pattern, where sbatch reads `%` as a replacement symbol) and `{{name|comment}}`."""
    def fill(match: re.Match) -> str:
        name, quote = match.groups()
        if name not in values:
            raise KeyError(f"slurm template names an unknown value: {name}")
        value, what = str(values[name]), FLAGS.get(name, name)
        if quote == "sh":
            return shlex.quote(value)
        if quote == "sbatch":
            return sbatch_word(value, what)
        if quote == "pattern":
            if "\\" in value:  # in a filename pattern it turns the replacement symbols (%j) off
                raise ValueError(f"{what} {value!r} cannot hold a backslash: sbatch reads it in the log file's name")
            return sbatch_word(value.replace("%", "%%"), what)
        if quote == "comment":
            return _comment(value)
        if quote:
            raise KeyError(f"slurm template names an unknown quoting: {quote}")
        return value

    return re.sub(r"\{\{(\w+)(?:\|(\w+))?\}\}", fill, template)


def template(launcher: str) -> str:
    name = "kiln.sbatch" if launcher == "srun" else "kiln-torchrun.sbatch"
    return resources.files("kiln.slurm").joinpath(name).read_text()
