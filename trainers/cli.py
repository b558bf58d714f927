"""`kiln`: the one entry point.

    kiln fit -c configs/<family>/tiny.yaml [-c more.yaml] [--key value] [--run_dir DIR]
    kiln sample --ckpt CKPT [--prompt TEXT | --class N | --input IMG ...] --out DIR
    kiln eval --ckpt CKPT [--metrics a,b] --out metrics.json
    kiln data <builder> --out URL
    kiln consolidate CKPT --out FILE
    kiln slurm -c CONFIG --nodes N --gpus-per-node G [--submit]
    kiln plan -c CONFIG --nodes N --gpus-per-node G [--json]
    kiln report RUN_DIR --out report.html
    kiln launch --nnodes N --nproc-per-node P --rdzv-endpoint HOST:PORT [--node-addr ADDR] -- fit ...

`fit` (and validate/test) is a LightningCLI: YAML checked against constructor type hints,
composed with repeated -c, any key overridable. Every failure a user can cause is reported as
one line, `kiln: error: ...`, with a non-zero exit; KILN_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

from kiln.launch import host

# Sleeping OpenMP threads and malloc thresholds that keep freed activations (launch/host.py);
# before torch loads OpenMP.
host.configure()
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException

from kiln.trainers.checkpoints.files import CheckpointError


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # DataLoader workers wrap the real error in a traceback: its last line is the message.
    if lines[0].startswith("Caught ") and len(lines) > 1:
        return lines[-1]
    if isinstance(exc, ArgumentError):
        return _config_error(" ".join(lines))
    return lines[0] if not isinstance(exc, (KeyError, FileNotFoundError)) else f"{type(exc).__name__}: {lines[0]}"


def _config_error(text: str) -> str:
    """jsonargparse nests its reasons (union -> class_path -> key); name the innermost one."""
    owner = re.findall(r"given class_path '([^']+)'", text)
    where = f" of {owner[-1]}" if owner else ""
    if unknown := re.search(r"Option '([^']+)' is not accepted", text):
        return f"unknown option '{unknown.group(1)}'{where}"
    keys = re.findall(r'Parser key "([^"]+)"', text)
    given = re.search(r"Given value type: <class '(\w+)'> Given value: (.*?)(?:\. Got value|$)", text)
    if len(keys) > 1 and given:
        expected = sorted(set(re.findall(r"Expected a <class '([\w.]+)'>", text)) - {"NoneType"})
        want = f" (expected {' or '.join(expected)})" if expected else ""
        return f"invalid value for '{keys[-1]}'{where}: {given.group(2)[:80]}{want}"
    if simple := re.search(r"""Parser key "([^"]+)": Expected a (.+?)\. Got value: (\S+)""", text):
        key, want, value = simple.groups()
        want = re.sub(r"<class '([\w.]+)'>|typing\.", r"\1", want)
        return f"invalid value for '{key}'{where}: {value[:80]} (expected {want})"
    return text[:300]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Each command's module is imported only when it runs (`kiln fit` imports Lightning, `kiln
    # slurm` need not): trainers/commands/<module>.py, `main(argv)`.
    modules = {"fit": "fit", "validate": "fit", "test": "fit", "eval": "evaluate", "data": "data",
               "consolidate": "consolidate", "slurm": "slurm", "launch": "launch", "plan": "plan",
               "report": "report", "sample": "sample"}
    commands = {name: lambda a, m=module: importlib.import_module(f"kiln.trainers.commands.{m}").main(a)
                for name, module in modules.items()}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip().split("\n\n")[1] if argv and argv[0] in ("-h", "--help") else
              f"usage: kiln {{{','.join(commands)}}} ...", file=sys.stderr if argv[:1] != ["-h"] else sys.stdout)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    command = argv[0]
    try:
        commands[command](argv if command in ("fit", "validate", "test") else argv[1:])
    except (ArgumentError, ValueError, KeyError, FileNotFoundError, PermissionError, RuntimeError, OSError,
            MisconfigurationException) as e:
        if os.environ.get("KILN_DEBUG"):
            raise
        hint = " (KILN_DEBUG=1 shows the traceback)" if type(e) in (RuntimeError, OSError) else ""
        # One write of the whole line: under several ranks every process reports the error to the
        # same stderr, and print's separate write of the newline let two ranks' lines run together.
        sys.stderr.write(f"kiln {command}: error: {_one_line(e)}{hint}\n")
        sys.stderr.flush()
        sys.exit(2 if isinstance(e, (ArgumentError, CheckpointError)) else 1)


if __name__ == "__main__":
    main()
