"""Environment record, progress bar and the outputs: markdown tables, JSON, PNG plots."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

import torch

import fused_norm
from cases import CPU_FLOOR

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes (and other VMs: steal) have kept the cores busy since boot (Linux)."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class Contention:
    """Measures how much of the machine's CPU time other processes took while the benchmark ran."""

    def __init__(self):
        self.busy, self.own, self.wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()

    def others_share(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return max(0.0, others) / ((time.perf_counter() - self.wall) * (os.cpu_count() or 1))


def environment(device: torch.device) -> dict:
    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "fused_norm": getattr(fused_norm, "__version__", None),
        "fused_norm_cpu_capability": fused_norm.cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "peak_bandwidth_GBps": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        env.update(
            device=props.name,
            cudnn=torch.backends.cudnn.version(),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
            l2_cache_MiB=round(props.L2_cache_size / 2**20, 1),
            memory_clock_kHz=clock_khz,
            memory_bus_width_bits=bus_bits,
        )
        if clock_khz and bus_bits:
            env["peak_bandwidth_GBps"] = round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)
    else:
        env["device"] = f"{env['cpu']} ({env['threads']} threads)"
    return env


def device_slug(env: dict) -> str:
    """cpu-amd-epyc-2c, nvidia-h100, nvidia-a100-sxm4, ..."""
    if env["device_type"] == "cpu":
        name = re.sub(r"\(r\)|\(tm\)|@.*$|\d+-core|\bprocessor\b|\bcpu\b", " ", env["cpu"].lower())
        return f"cpu-{_slug(name)}-{env['threads']}c"
    name = re.sub(r"\b\d+\s*gb\b|\bhbm\w*", " ", env["device"].lower())
    return _slug(name)


def _slug(text: str) -> str:
    return "-".join(w for w in re.split(r"[^a-z0-9]+", text) if w) or "device"


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------

def progress(items: list, describe):
    """Yields items while showing a progress bar on stderr: tqdm when installed, else text."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(items, file=sys.stderr, unit="case", dynamic_ncols=True)
        for item in bar:
            bar.set_postfix_str(describe(item), refresh=False)
            yield item
        return
    tty = sys.stderr.isatty()
    for i, item in enumerate(items):
        done = 30 * i // max(len(items), 1)
        line = f"[{'#' * done}{'.' * (30 - done)}] {i + 1}/{len(items)} {describe(item)}"
        print(f"\r{line:<100}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        yield item
    if tty:
        print(file=sys.stderr)


def optional_modules_note() -> list:
    notes = []
    for module, missing in (("tqdm", "tqdm not installed: plain text progress"),
                            ("matplotlib", "matplotlib not installed: no plots (pip install matplotlib)")):
        try:
            __import__(module)
        except ImportError:
            notes.append(missing)
    return notes


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------

def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _num(value, fmt="{:.0f}") -> str:
    return "" if value is None else fmt.format(value)


def _geomean(values: list) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _measured_peers(records: list, peers: list) -> list:
    """The peers that ran (or failed) in at least one record: they get columns."""
    return [p for p in peers if any(p in r["impls"] and "skipped" not in r["impls"][p] for r in records)]


def _cell(entry: dict | None) -> str:
    if not entry or "skipped" in entry:
        return "-"
    return "error" if "error" in entry else _time(entry["median_s"])


def markdown(run: dict) -> str:
    env, results = run["environment"], run["results"]
    labels = {name: info["label"] for name, info in run["implementations"].items()}
    peers = run["settings"]["peers"]
    cpu = env["device_type"] == "cpu"
    judged = any("target" in r for r in results)  # CPU runs other than --quick
    peak = env["peak_bandwidth_GBps"]
    out = [f"# fused_norm benchmark: {env['device']}", ""]
    out += [f"**{n}**\n" for n in run["notes"] if n.startswith("WARNING")]
    rows = [("device", env["device"]), ("torch", env["torch"]), ("CUDA", env["cuda"] or "-")]
    if not cpu:
        rows += [("cuDNN", env["cudnn"]), ("peak bandwidth", f"{peak} GB/s" if peak else "unknown")]
    rows += [("fused_norm CPU kernels", env["fused_norm_cpu_capability"]), ("threads", env["threads"]),
             ("git commit", env["git_commit"]), ("date", env["date"]), ("command", f"`{env['command']}`")]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    out += ["## How to read this", ""]
    out += [f"- {line}" for line in (
        f"Times are medians. {run['settings']['timing']}.",
        "x peer = peer time / fused_norm time (above 1: fused_norm is faster).",
        "GB/s = bytes counted / median time; % copy = fused_norm GB/s relative to a copy of x "
        "(same size, same device, same run)" + ("" if cpu else "; % peak = relative to the device's peak "
                                                  "bandwidth (2 x memory clock x bus width)") + ".",
        run["bytes_counted"],
    )]
    out += [f"- {note}" for note in run["notes"] if not note.startswith("WARNING")] + [""]

    out += _summary(results, peers, labels, cpu, judged)
    by_sweep = defaultdict(list)
    for r in results:
        by_sweep[r["sweep"]].append(r)
    for sweep, records in by_sweep.items():
        info = run["sweeps"][sweep]
        wall = sum(r.get("wall_s", 0) for r in records)
        out += [f"## {sweep}: {info['description']}", "", f"{len(records)} cases, {wall:.0f} s.", ""]
        shown = _measured_peers(records, peers)
        head = ["shape", "op", "dtype", "fused_norm", "GB/s"] + ([] if cpu else ["% peak"]) + ["% copy"]
        for p in shown:
            head += [labels[p], f"x {labels[p]}"]
        head += ["target", "verdict"] if judged else []
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        errors = []
        for r in records:
            ours = r.get("impls", {}).get("fused_norm")
            row = [r["shape_text"], r["op"], r["dtype"], _cell(ours)]
            m = ours if ours and "median_s" in ours else {}
            row += [_num(m.get("gbps"), "{:.1f}")] + ([] if cpu else [_num(m.get("pct_peak"))])
            row += [_num(m.get("pct_copy"))]
            for p in shown:
                ratio = r.get("speedup", {}).get(p)
                row += [_cell(r.get("impls", {}).get(p)), _num(ratio, "{:.2f}")]
            if judged:
                row += [f">= {r['target']}", r["verdict"]]
            out.append("| " + " | ".join(str(c) for c in row) + " |")
            if "error" in r:
                errors.append(f"{r['case']}: {r['error']}")
            errors += [f"{r['case']} / {labels.get(n, n)}: {e['error']}"
                       for n, e in r.get("impls", {}).items() if "error" in e]
        out.append("")
        if errors:
            out += ["Errors (full messages in results.json):", ""] + [f"- {e.splitlines()[0][:300]}" for e in errors] + [""]
    return "\n".join(out)


def _median_of(entries: list, key: str):
    values = [e[key] for e in entries if e.get(key) is not None]
    return median(values) if values else None


def _summary(results, peers, labels, cpu, judged) -> list:
    """Per op and dtype: geometric-mean speedup over each peer, median % of copy/peak."""
    groups = defaultdict(list)
    for r in results:
        if "median_s" in r.get("impls", {}).get("fused_norm", {}):
            groups[(r["op"], r["dtype"])].append(r)
    if not groups:
        return ["## Summary", "", "No fused_norm measurement succeeded.", ""]
    shown = _measured_peers(results, peers)
    head = ["op", "dtype", "cases", "median % copy"] + ([] if cpu else ["median % peak"])
    head += [f"x {labels[p]} (geomean, min)" for p in shown]
    out = ["## Summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, dtype), records in groups.items():
        ours = [r["impls"]["fused_norm"] for r in records]
        row = [op, dtype, len(records), _num(_median_of(ours, "pct_copy"))]
        if not cpu:
            row.append(_num(_median_of(ours, "pct_peak")))
        for p in shown:
            ratios = [r["speedup"][p] for r in records if p in r.get("speedup", {})]
            row.append(f"{_geomean(ratios):.2f} ({min(ratios):.2f})" if ratios else "-")
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    out.append("")
    if judged:
        verdicts = [r for r in results if r.get("verdict") in ("met", "MISSED")]
        missed = [r for r in verdicts if r["verdict"] == "MISSED"]
        targets = [r for r in verdicts if r["target_case"]]
        out += [f"CPU targets (speedup over torch eager): {sum(r['verdict'] == 'met' for r in targets)}/"
                f"{len(targets)} target cases met; {len(verdicts) - len(missed)}/{len(verdicts)} of all "
                f"cases met their target or the {CPU_FLOOR}x floor."]
        if missed:
            out += ["", "Missed:", ""] + [f"- {r['sweep']}: {r['case']}: x{r['speedup']['torch']:.2f} "
                                          f"(target {r['target']})" for r in missed]
        out.append("")
    return out


# ---------------------------------------------------------------------------------------
# JSON and plots
# ---------------------------------------------------------------------------------------

def write_json(run: dict, path: Path) -> None:
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")


def plot(run: dict, outdir: Path) -> list:
    """One PNG per sweep, op and dtype: GB/s of each implementation against the sweep's x axis,
    with the copy of the same size (and the device's peak) as references. Returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = run["environment"]
    labels = {name: info["label"] for name, info in run["implementations"].items()}
    groups = defaultdict(list)
    for r in run["results"]:
        groups[(r["sweep"], r["op"], r["dtype"])].append(r)
    files = []
    for (sweep, op, dtype), records in groups.items():
        ticks = [r["label"] for r in records]
        xs = range(len(records))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(records) + 3), 4.5))
        series = {name: [r.get("impls", {}).get(name, {}).get("gbps") for r in records] for name in labels}
        series["copy"] = [r.get("copy", {}).get("gbps") for r in records]
        drawn = False
        for name, ys in series.items():
            if all(y is None for y in ys):
                continue
            style = dict(marker="o", linewidth=2.5 if name == "fused_norm" else 1.5)
            if name == "copy":
                style.update(linestyle="--", color="gray", marker="")
            ax.plot(xs, [math.nan if y is None else y for y in ys], label=labels.get(name, "copy of x"), **style)
            drawn = drawn or name != "copy"
        if not drawn:
            plt.close(fig)
            continue
        if env["peak_bandwidth_GBps"]:
            ax.axhline(env["peak_bandwidth_GBps"], color="black", linestyle=":", label="peak (properties)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(run["sweeps"][sweep]["x_label"])
        ax.set_ylabel("GB/s (bytes counted / median time)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{op} {dtype}, {sweep} - {env['device']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{sweep}_{op}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files
