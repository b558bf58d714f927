"""What the benchmark scripts share: the machine's description, spreads, BENCHMARKS.md sections
and the result file each row leaves in bench/results/ (bench/README.md: "Result files")."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess

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


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load1() -> float:
    return os.getloadavg()[0]


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
    tmp = BENCHMARKS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, BENCHMARKS)


def write_result(row: str, result: dict) -> str:
    """bench/results/<row>.json: the row's headline in the shape bench/run.py reads."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{row}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"row": row, **result}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
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
