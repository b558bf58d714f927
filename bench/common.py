"""What the benchmark scripts share: running each side in a fresh process and the rounds that
alternate them, the machine's description, spreads, profiles, BENCHMARKS.md sections and the
result file each row leaves in bench/results/ (bench/README.md: "Result files")."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
RESULTS = os.path.join(REPO, "bench", "results")


def spread(values: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20
    return f"{os.cpu_count()} cores (`{model}`), {mem:.0f} GiB RAM, {platform.platform()}"


def git_state(paths: tuple[str, ...] = ()) -> str:
    """The commit, and whether `paths` (what the benchmark measures) have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    head = git("log", "-1", "--format=%h %s").strip()
    dirty = git("status", "--porcelain", "--", *paths).splitlines() if paths else []
    changed = sorted({line[3:] for line in dirty if line.strip()})
    return f"commit `{head[:60]}`" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


def versions(*modules: str) -> str:
    """"Python 3.x, torch 2.x, ...": the interpreter's version and each module's `__version__`."""
    import importlib

    return ", ".join([f"Python {platform.python_version()}",
                      *(f"{m} {importlib.import_module(m).__version__}" for m in modules)])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load1() -> float:
    return os.getloadavg()[0]


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (`getrusage`: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    """Wait for the GPU's queued work, on a CUDA device; nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def add_write_and_profile(parser: argparse.ArgumentParser, heading: str, profile_steps: int,
                          unit: str = "steps") -> None:
    """--write (the section `heading` of BENCHMARKS.md) and the profile's options: --profile,
    --profile-steps, --top."""
    parser.add_argument("--write", action="store_true", help=f"replace the '{heading[3:]}' section of BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="only profile every side and print the top ops")
    parser.add_argument("--profile-steps", type=int, default=profile_steps,
                        help=f"profiled {unit} (with --profile or --write)")
    parser.add_argument("--top", type=int, default=12, help="ops listed per side in the profile")


def parse_args(parser: argparse.ArgumentParser, run_side) -> argparse.Namespace:
    """The command line; in a side's own process (`--_run SPEC`, from `run_child`) runs that side,
    prints its result as JSON and exits."""
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        print(json.dumps(run_side(json.loads(args._run))))
        sys.exit(0)
    return args


def run_child(script: str, spec: dict, label: str, python: str = sys.executable, cwd: str = REPO,
              **env: str) -> dict:
    """`script --_run SPEC` in a fresh process (under `python`), its last stdout line as JSON; with
    spec["threads"] threads and the process settings `kiln` makes for itself (launch/host.py:
    OMP_WAIT_POLICY=PASSIVE, glibc malloc thresholds), whichever side it runs, and `env` on top."""
    from kiln.launch.host import MALLOC_ENV

    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), OMP_WAIT_POLICY="PASSIVE", **MALLOC_ENV, **env)
    out = subprocess.run([python, os.path.abspath(script), "--_run", json.dumps(spec)], env=env, cwd=cwd,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{label} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def venv_python(venv: str, probe: str, want: str, packages: list[str]) -> str:
    """`venv`'s python, where the code `probe` prints `want`; the venv is created when missing and
    `packages` pip-installed into it when the probe prints anything else."""
    python = os.path.join(venv, "bin", "python")

    def installed() -> str:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    if not os.path.exists(python):
        print(f"creating {os.path.relpath(venv, REPO)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if installed() != want:
        subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True)
        if installed() != want:
            sys.exit(f"{venv} has {installed() or '(nothing)'}; wanted {want}")
    return python


def alternate(rounds: int, sides, run, describe, label=str, rotate: bool = False) -> dict:
    """`run(side, round_)` for every side in each round, the sides in turn (with `rotate`, the
    order turns by one each round); each result gets the 1-minute load average as its run started
    (`load1_before`) and a progress line on stderr, `describe(result)`. Returns each side's
    results, one a round."""
    runs: dict = {side: [] for side in sides}
    for round_ in range(rounds):
        turn = round_ % len(sides) if rotate else 0
        for side in [*sides[turn:], *sides[:turn]]:
            load = load1()
            result = run(side, round_) | {"load1_before": load}
            runs[side].append(result)
            print(f"round {round_ + 1} {label(side)}: {describe(result)}, load {load1():.2f}", file=sys.stderr)
    return runs


def timed_steps(step, spec: dict) -> dict:
    """spec["warmup"] untimed calls of `step`, then spec["steps"] timed ones: each one's wall and
    CPU seconds, peak RSS and the RSS before the first step; in "profile" mode `top_ops` of the
    steps instead."""
    rss_built = rss_mib()  # model, optimizer without its state, batch: before the first step
    for _ in range(spec["warmup"]):
        step()
    if spec["mode"] == "profile":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                step()
        return top_ops(prof, spec["steps"], spec["top"])
    wall, cpu = [], []
    for _ in range(spec["steps"]):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_rss_mib(), "rss_before_step_mib": rss_built}


def top_ops(prof, steps: int, top: int) -> dict:
    """A `torch.profiler` run's self CPU time per step, and its `top` ops by self CPU time (ms per
    step, share, calls per step)."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"self_cpu_ms_per_step": total / 1e3 / steps,
            "top": [{"op": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total,
                     "calls": e.count / steps} for e in ranked]}


def print_top_ops(profiles: dict, digits: int = 0, unit: str = "step", label=str) -> None:
    """Each side's `top_ops`, for the console (--profile)."""
    for side, result in profiles.items():
        print(f"\n== {label(side)}: self CPU {result['self_cpu_ms_per_step']:.{digits}f} ms per {unit}, top ops")
        for row in result["top"]:
            print(f"{row['ms']:9.{digits + 1}f} ms {row['share']:6.1%} {row['calls']:6.0f} calls  {row['op']}")


def top_ops_table(profiles: dict, rows: int, digits: int = 0, unit: str = "step", label=str) -> list[str]:
    """The sides' `top_ops` side by side, a rank a row: the markdown table of "Where the time goes"."""
    lines = ["| rank | " + " | ".join(f"{label(s)} (self CPU {p['self_cpu_ms_per_step']:.0f} ms/{unit})"
                                    for s, p in profiles.items()) + " |", "|---" * (len(profiles) + 1) + "|"]
    for i in range(rows):
        cells = []
        for p in profiles.values():
            top = p["top"]
            cells.append(f"`{top[i]['op']}` {top[i]['ms']:.{digits}f} ({top[i]['share']:.0%}, {top[i]['calls']:.0f})"
                         if i < len(top) else "")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def run_meta(script: str, started: float, load_before: float, git_paths: tuple[str, ...], **extra) -> dict:
    """What a report says of its run: the command, machine, commit, date, load before and after,
    minutes taken, and `extra`."""
    return {"command": shlex.join(["python3", os.path.relpath(os.path.abspath(script), REPO), *sys.argv[1:]]),
            "machine": machine(), "git": git_state(git_paths), "load_before": load_before, "load_after": load1(),
            "date": utc_now(), "elapsed_s": time.time() - started, **extra}


def meta_lines(meta: dict, versions: str, load_note: str = "") -> list[str]:
    """A section's closing list: command, machine, date and commit, versions, load average."""
    return [f"- Command: `{meta['command']}`; {meta['elapsed_s'] / 60:.1f} minutes.",
            f"- Machine: {meta['machine']}. Date: {meta['date']}, at {meta['git']}.",
            f"- Versions: {versions}.",
            f"- Load average (1 min): {meta['load_before']:.2f} before, {meta['load_after']:.2f} after{load_note}."]


def save(row: str, result: dict, heading: str, section: str, meta: dict, write: bool) -> None:
    """The row's result file (with the run's command, date and load); with `write`, its section of
    BENCHMARKS.md too."""
    path = write_result(row, {"section": heading[3:], **result, "command": meta["command"], "date": meta["date"],
                              "load1": [meta["load_before"], meta["load_after"]], "written": write})
    print(f"result: {os.path.relpath(path, REPO)}", file=sys.stderr)
    if write:
        write_section(heading, section)
        print(f"wrote the '{heading[3:]}' section of BENCHMARKS.md", file=sys.stderr)


def write_section(heading: str, section: str) -> None:
    """Replace the section `heading` (a level-2 heading line, up to the next level-2 heading) in
    BENCHMARKS.md, or append it; read right before writing, so other sections stay as they are."""
    with open(BENCHMARKS, encoding="utf-8") as f:
        text = f.read()
    start = text.find(f"\n{heading}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        after = re.search(r"^## ", text[start + len(heading) + 2:], flags=re.M)
        end = start + len(heading) + 2 + after.start() if after else len(text)
        text = text[:start + 1] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if after else "")
    replace_file(BENCHMARKS, text)


def replace_file(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, so that no reader sees it half written."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def result_path(row: str, written: bool) -> str:
    """bench/results/<row>.json, the figures of record, for a run that also rewrote its BENCHMARKS.md
    section (`--write`); bench/results/<row>.scratch.json (git-ignored) for any other run, so
    a look never rewrites the tracked file."""
    return os.path.join(RESULTS, f"{row}.json" if written else f"{row}.scratch.json")


def write_result(row: str, result: dict) -> str:
    """The row's headline in the shape bench/run.py reads, at `result_path(row, result["written"])`."""
    os.makedirs(RESULTS, exist_ok=True)
    path = result_path(row, bool(result.get("written")))
    replace_file(path, json.dumps({"row": row, **result}, indent=1) + "\n")
    return path


def count_flops(fn) -> int:
    """FLOPs that `fn()` runs (matrix products, convolutions, attention), forward and backward
    if it runs backward, by `torch.utils.flop_counter.FlopCounterMode`. Unmasked float32 attention
    on CPU runs a kernel the counter has no formula for (it would count 0): it gets the formulas
    of the GPU attention kernels."""
    import torch
    from torch.utils import flop_counter

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()
