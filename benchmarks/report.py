"""Environment record, progress bar and the outputs: markdown tables, JSON, PNG plots.

    python benchmarks/report.py benchmarks/results/cpu-intel-xeon-2c   # re-render from results.json

Re-rendering rewrites results.md and the plots from the measurements in results.json (the
numbers are not touched); it needs neither the built extension nor a rerun."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from statistics import median

import torch

from cases import CPU_FLOOR

REPO = Path(__file__).resolve().parent.parent
# A CPU run during which other processes took more than this share of the machine's CPU time
# is marked as disturbed in results.md and in every plot.
DISTURBED_SHARE = 0.1


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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


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
    import fused_norm  # here, not at the top: re-rendering a results folder needs no built extension

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if dirty is None else bool(dirty),  # tracked files changed since the commit
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
# Plain names (titles, tables) and the run's conditions
# ---------------------------------------------------------------------------------------

OP_NAMES = {
    "ln_fwd": "LayerNorm forward",
    "ln_bwd": "LayerNorm backward",
    "ln_fwdbwd": "LayerNorm forward+backward",
    "bn_train_fwd": "BatchNorm training forward",
    "bn_fwdbwd": "BatchNorm training forward+backward",
    "bn_eval": "BatchNorm eval forward",
}
# An op id not in OP_NAMES (nor described in the run) is read word by word: "rms_fwd" is
# "RMSNorm forward", "add_ln_fwdbwd" "add + LayerNorm forward+backward".
_OP_WORDS = {"ln": "LayerNorm", "bn": "BatchNorm", "rms": "RMSNorm", "gn": "GroupNorm", "add": "add +",
             "fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward", "train": "training"}
SWEEP_NAMES = {
    "targets": "CPU target cases",
    "ln-liger": "widths 1K to 16K (Liger-Kernel sweep)",
    "ln-quack": "widths 256 to 256K (QuACK sweep)",
    "ln-transformer": "transformer widths",
    "bn1d": "(N, C) inputs",
    "bn1d-ncl": "(N, C, L) inputs",
    "bn2d-resnet50": "ResNet-50 layers, NCHW",
    "bn2d-resnet50-cl": "ResNet-50 layers, channels_last",
    "quick": "smoke-test shapes",
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
AXIS_NAMES = {"N": "row width N", "hidden": "hidden size", "C x H x W": "channels x height x width",
              "shape": "input shape", "case": "input shape"}


def op_name(op: str, run: dict | None = None) -> str:
    described = (run or {}).get("ops", {}).get(op)
    return OP_NAMES.get(op) or described or " ".join(_OP_WORDS.get(w, w) for w in op.split("_"))


def sweep_name(sweep: str) -> str:
    return SWEEP_NAMES.get(sweep, f"{sweep} sweep")


def dtype_name(dtype: str) -> str:
    return DTYPE_NAMES.get(dtype, dtype)


def x_axis_name(info: dict, records: list) -> str:
    """The sweep's x axis in words, with the dimension the ticks leave out: "row width N (1024 rows)"."""
    name = AXIS_NAMES.get(info["x_label"], info["x_label"])
    if all(r["label"] == r["shape_text"] for r in records):
        return name
    first, count = Counter(r["shape"][0] for r in records).most_common(1)[0]
    fixed = f"{first} rows" if len(records[0]["shape"]) == 2 else f"batch {first}"
    return f"{name} ({fixed}{'' if count == len(records) else ', unless marked'})"


def disturbed(env: dict) -> str | None:
    """Why the run's timings are unreliable, or None. Only CPU timings are judged: there the
    benchmark shares the cores with whatever else runs."""
    share = env.get("others_cpu_share")
    if env["device_type"] == "cpu" and share is not None and share > DISTURBED_SHARE:
        return f"Run disturbed: other processes used {100 * share:.0f}% of the CPU time; numbers unreliable"
    return None


def _disturbance(env: dict) -> str:
    share = env.get("others_cpu_share")
    if share is None:
        return "not recorded"
    used = f"other processes used {100 * share:.0f}% of the machine's CPU time during the run"
    if env["device_type"] != "cpu":
        return f"not judged for GPU timings ({used})"
    return f"**YES**, {used}: the timings are unreliable" if disturbed(env) else f"no ({used})"


def _commit(env: dict) -> str:
    commit = env.get("git_commit") or "unknown"
    short = commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    if "git_dirty" not in env or env["git_dirty"] is None:
        return f"{short} (uncommitted changes: not recorded)"
    return short + ("+dirty" if env["git_dirty"] else "")


def _date(env: dict) -> str:
    try:
        when = datetime.datetime.fromisoformat(env["date"])
    except (KeyError, TypeError, ValueError):
        return env.get("date") or "not recorded"
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def conditions(env: dict) -> list:
    """(name, value) rows: what a reader needs to judge the numbers, the recorded values only."""
    cpu = env["device_type"] == "cpu"
    threads = env.get("threads", "not recorded")
    if env.get("cpu_count"):
        threads = f"{threads} (the machine has {env['cpu_count']} CPUs)"
    rows = [("device", env["device"]), ("torch", env["torch"])]
    if not cpu:
        peak = env["peak_bandwidth_GBps"]
        rows += [("CUDA", env["cuda"] or "-"), ("cuDNN", env.get("cudnn")),
                 ("peak bandwidth", f"{peak} GB/s" if peak else "unknown")]
    rows += [("fused_norm commit", _commit(env)), ("threads", threads), ("date", _date(env)),
             ("disturbed", _disturbance(env)), ("fused_norm CPU kernels", env["fused_norm_cpu_capability"]),
             ("command", f"`{env['command']}`")]
    return rows


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
    plots = run.get("plots") or []
    cpu = env["device_type"] == "cpu"
    judged = any("target" in r for r in results)  # CPU runs other than --quick
    out = [f"# fused_norm benchmark: {env['device']}", ""]
    if disturbed(env):
        out += [f"**{disturbed(env)}.**", ""]
    out += ["| condition | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in conditions(env)] + [""]
    if SPEEDUP_PLOT in plots:
        out += [f"![fused_norm speedup over each peer, per op and dtype]({SPEEDUP_PLOT})", ""]
    if plots:
        out += [f"Plots: [speedup summary]({SPEEDUP_PLOT}) (geometric mean per op and dtype); GB/s per "
                "input shape under each sweep below." if SPEEDUP_PLOT in plots
                else "Plots: GB/s per input shape under each sweep below.", ""]
    out += ["## How to read this", ""]
    out += [f"- {line}" for line in (
        f"Times are medians. {run['settings']['timing']}.",
        "x peer = peer time / fused_norm time (above 1: fused_norm is faster).",
        "GB/s = bytes counted / median time; % copy = fused_norm GB/s relative to a copy of x "
        "(same size, same device, same run: the memory-bandwidth reference)" + (
            "" if cpu else "; % peak = relative to the device's peak bandwidth (2 x memory clock x bus width)")
        + ". Over 100% copy is possible: inputs that fit in cache, and bytes counted twice (an op that reads "
        "x twice, the second time from cache), beat the copy's rate.",
        run["bytes_counted"],
    )]
    out += [f"- {note}" for note in run["notes"]] + [""]

    out += _summary(run, results, peers, labels, cpu, judged)
    by_sweep = defaultdict(list)
    for r in results:
        by_sweep[r["sweep"]].append(r)
    for sweep, records in by_sweep.items():
        info = run["sweeps"][sweep]
        wall = sum(r.get("wall_s", 0) for r in records)
        name = sweep_name(sweep)
        out += [f"## {name[0].upper()}{name[1:]}: `{sweep}`", "", f"{info['description']}. {len(records)} cases, "
                f"{wall:.0f} s.", ""]
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
        pairs = dict.fromkeys((r["op"], r["dtype"]) for r in records)
        links = [f"[{op_name(op, run)}, {dtype_name(dtype)}]({_plot_file(sweep, op, dtype)})" for op, dtype in pairs
                 if _plot_file(sweep, op, dtype) in plots]
        if links:
            out += ["Plots: " + " · ".join(links), ""]
        if errors:
            out += ["Errors (full messages in results.json):", ""] + [f"- {e.splitlines()[0][:300]}" for e in errors] + [""]
    return "\n".join(out)


def _median_of(entries: list, key: str):
    values = [e[key] for e in entries if e.get(key) is not None]
    return median(values) if values else None


def _summary(run, results, peers, labels, cpu, judged) -> list:
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
        row = [op_name(op, run), dtype, len(records), _num(_median_of(ours, "pct_copy"))]
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


SPEEDUP_PLOT = "speedup.png"
# One color per implementation in every plot (peers added later get the next free ones).
_IMPL_COLORS = {"fused_norm": "#1f77b4", "torch": "#ff7f0e", "compile": "#2ca02c", "apex": "#d62728",
                "liger": "#9467bd", "quack": "#8c564b"}
_DTYPE_COLORS = {"fp32": "#4c72b0", "bf16": "#dd8452", "fp16": "#55a868", "fp64": "#8172b3"}
_SPARE_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
COPY_NOTE = ("Dashed: memory-bandwidth reference, a copy of the input (same size) timed in the same run. "
             "Inputs that fit in cache can beat it, and so can ops whose counted bytes include a second "
             "read of the input.")


def _plot_file(sweep: str, op: str, dtype: str) -> str:
    return f"{sweep}_{op}_{dtype}.png"


def _color(table: dict, key: str, order: list) -> str:
    spare = [k for k in order if k not in table]
    return table.get(key) or _SPARE_COLORS[spare.index(key) % len(_SPARE_COLORS)]


def _header(ax, title: str, env: dict, above: float = 6) -> None:
    """Title, the run's conditions in small type and, when the run was disturbed, a red line; the
    lowest line `above` points over the axes."""
    lines = [(title, dict(fontsize=11, fontweight="bold")),
             (f"{env['device']} · torch {env['torch']} · fused_norm {_commit(env).split(' ')[0]} · {_date(env)}",
              dict(fontsize=8, color="dimgray"))]
    if disturbed(env):
        lines.append((disturbed(env), dict(fontsize=9, color="red", fontweight="bold")))
    offset = above
    for text, style in reversed(lines):
        ax.annotate(text, xy=(0, 1), xycoords="axes fraction", xytext=(0, offset), textcoords="offset points",
                    ha="left", va="bottom", **style)
        offset += style["fontsize"] * 1.45


def _side_note(ax, text: str) -> None:
    import textwrap
    ax.annotate("\n".join(textwrap.fill(p, 42) for p in text.split("\n")), xy=(1, 0), xycoords="axes fraction",
                xytext=(10, 0), textcoords="offset points", ha="left", va="bottom", fontsize=7.5, color="dimgray")


def plot(run: dict, outdir: Path) -> list:
    """The speedup summary, then one PNG per sweep, op and dtype: GB/s of each implementation per
    input shape as grouped bars (the shapes are categories, not points of a trend), with the copy
    of x (and the GPU's peak) as the bandwidth reference. Returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if _plot_speedups(plt, run, outdir / SPEEDUP_PLOT):
        files.append(SPEEDUP_PLOT)
    groups = defaultdict(list)
    for r in run["results"]:
        groups[(r["sweep"], r["op"], r["dtype"])].append(r)
    for (sweep, op, dtype), records in groups.items():
        name = _plot_file(sweep, op, dtype)
        if _plot_sweep(plt, run, sweep, op, dtype, records, outdir / name):
            files.append(name)
    return files


def _gbps_range(record: dict, impl: str):
    """(median, p20, p80) GB/s of one implementation in one record, or None."""
    entry = record.get("impls", {}).get(impl, {})
    if "gbps" not in entry:
        return None
    nbytes = record["bytes"]
    return entry["gbps"], nbytes / entry["p80_s"] / 1e9, nbytes / entry["p20_s"] / 1e9


def _plot_sweep(plt, run, sweep, op, dtype, records, path: Path) -> bool:
    env = run["environment"]
    labels = {name: info["label"] for name, info in run["implementations"].items()}
    names = sorted((n for n in labels if any(_gbps_range(r, n) for r in records)), key=lambda n: n != "fused_norm")
    if "fused_norm" not in names:
        return False
    n, k = len(records), len(names)
    width = 0.8 / k
    fig_width = max(5.5, n * (0.28 * k + 0.45) + 1.5)
    fig, ax = plt.subplots(figsize=(fig_width, 4.2))
    tops, ours_tops = [0.0] * n, [0.0] * n
    for i, name in enumerate(names):
        for j, r in enumerate(records):
            g = _gbps_range(r, name)
            if g is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, g[0], width * 0.9, color=_color(_IMPL_COLORS, name, names),
                   label=labels[name] if j == min(jj for jj, rr in enumerate(records) if _gbps_range(rr, name))
                   else None, yerr=[[g[0] - g[1]], [g[2] - g[0]]],
                   error_kw=dict(ecolor="black", elinewidth=0.7, capsize=1.5, alpha=0.6))
            tops[j] = max(tops[j], g[2])
            if name == "fused_norm":
                ours_tops[j] = g[2]
    copies = [(j, r["copy"]["gbps"]) for j, r in enumerate(records) if r.get("copy", {}).get("gbps")]
    for idx, (j, gbps) in enumerate(copies):
        ax.hlines(gbps, j - 0.46, j + 0.46, colors="black", linestyles="--", linewidth=1.3,
                  label="memory-bandwidth reference:\na copy of the input (same size)" if idx == 0 else None)
        tops[j] = max(tops[j], gbps)
    peak = env["peak_bandwidth_GBps"]
    if peak:
        ax.axhline(peak, color="black", linestyle=":", label="device peak bandwidth\n(from its properties)")
    ours_x = width * 0.5 - 0.4  # fused_norm is drawn first in each group
    for j, r in enumerate(records):
        ratio = r.get("speedup", {}).get("torch")
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", xy=(j + ours_x, ours_tops[j]), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7.5, fontweight="bold",
                        color=_IMPL_COLORS["fused_norm"],
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.8))
    ax.set_xticks(range(n))
    ticks = [r["label"] for r in records]
    group_points = 0.775 * fig_width * 72 / n  # matplotlib's default axes span 77.5% of the width
    long_ticks = max(len(t) for t in ticks) * 5.2 > 0.9 * group_points  # about 5 points a character
    ax.set_xticklabels(ticks, rotation=25 if long_ticks else 0, ha="right" if long_ticks else "center", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(x_axis_name(run["sweeps"][sweep], records))
    ax.set_ylabel("GB/s, higher is better")
    ax.set_ylim(0, max(*tops, peak or 0) * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _header(ax, f"{op_name(op, run)}, {dtype_name(dtype)}, {sweep_name(sweep)}", env)
    handles, shown = ax.get_legend_handles_labels()
    order = sorted(range(len(shown)), key=lambda i: shown[i] not in labels.values())  # bars first
    ax.legend([handles[i] for i in order], [shown[i] for i in order], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    note = ("Bars: GB/s = bytes the op must move / median time; whiskers: 20th to 80th percentile.\n"
            + COPY_NOTE)
    if any("torch" in r.get("speedup", {}) for r in records):
        note += "\nNumbers over the fused_norm bars: its speedup over torch eager."
    _side_note(ax, note)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_speedups(plt, run: dict, path: Path) -> bool:
    """Horizontal bars per op (rows) and dtype (colors): geometric-mean speedup of fused_norm over
    each peer across the run's cases, with the slowest and fastest case in words, a line at 1."""
    env, results = run["environment"], run["results"]
    labels = {name: info["label"] for name, info in run["implementations"].items()}
    peers = [p for p in run["settings"]["peers"] if any(p in r.get("speedup", {}) for r in results)]
    if not peers:
        return False
    ops = list(dict.fromkeys(r["op"] for r in results))
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    all_sweeps = list(dict.fromkeys(r["sweep"] for r in results))
    height = 0.8 / len(dtypes)
    cols = min(3, len(peers))
    rows = -(-len(peers) // cols)
    fig, axes = plt.subplots(rows, cols, sharey=True, squeeze=False,
                             figsize=(2.0 + 3.6 * cols, (1.4 + 0.32 * len(ops) * len(dtypes)) * rows))
    for ax in axes.flat[len(peers):]:
        ax.remove()
    for ax, peer in zip(axes.flat, peers):
        compared = [r for r in results if peer in r.get("speedup", {})]
        right = 1.0
        for d, dtype in enumerate(dtypes):
            for i, op in enumerate(ops):
                ratios = [r["speedup"][peer] for r in compared if r["op"] == op and r["dtype"] == dtype]
                if not ratios:
                    continue
                y, g = i - 0.4 + height * (d + 0.5), _geomean(ratios)
                ax.barh(y, g, height * 0.9, color=_color(_DTYPE_COLORS, dtype, dtypes),
                        label=dtype_name(dtype) if i == min(ii for ii, o in enumerate(ops) if any(
                            r["op"] == o and r["dtype"] == dtype for r in compared)) else None)
                value = f"{g:.2f}x"
                ax.annotate(value, xy=(g, y), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=8, fontweight="bold")
                if len(ratios) > 1:  # after the value: about 5.2 points a bold character
                    ax.annotate(f"({min(ratios):.2f} to {max(ratios):.2f})", xy=(g, y),
                                xytext=(6 + 5.2 * len(value), 0),
                                textcoords="offset points", va="center", fontsize=7, color="dimgray")
                right = max(right, g)
        ax.axvline(1.0, color="black", linewidth=1.0)
        ax.set_xlim(0, right * 2.0)  # room for the numbers right of the longest bar
        ax.tick_params(axis="y", labelsize=8.5)
        sweeps = list(dict.fromkeys(r["sweep"] for r in compared))
        where = "" if sweeps == all_sweeps else f"\nmeasured in {', '.join(sweep_name(s) for s in sweeps)} only"
        ax.set_title(f"over {labels[peer]} ({len(compared)} cases){where}", fontsize=9.5)
        ax.set_xlabel(f"{labels[peer]} time / fused_norm time", fontsize=8.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_yticks(range(len(ops)))
    axes[0][0].set_yticklabels([op_name(op, run) for op in ops])
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if rows > 1:
        fig.subplots_adjust(hspace=0.3)
    _side_note(axes[0][-1], "Bars: geometric mean of fused_norm's speedups over the cases of each op and "
                            "dtype; in parentheses: the slowest and the fastest case. Right of the line at "
                            "1.0, fused_norm is faster: higher is better.")
    title_lines = max(1 + ("\n" in ax.get_title()) for ax in axes[0] if ax.figure)
    _header(axes[0][0], "fused_norm speedup per op and dtype (higher is better)", env,
            above=10 + 9.5 * 1.3 * title_lines)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# Re-rendering a results folder
# ---------------------------------------------------------------------------------------

def write(run: dict, outdir: Path) -> str:
    """Plots (when matplotlib is there), results.md and results.json into outdir; files of an
    earlier rendering that are no longer produced are removed. Returns the markdown."""
    try:
        plots = plot(run, outdir)
    except ImportError:
        plots = []
    for stale in set(run.get("plots") or []) - set(plots):
        (outdir / stale).unlink(missing_ok=True)
    run["plots"] = plots
    text = markdown(run)
    (outdir / "results.md").write_text(text + "\n")
    write_json(run, outdir / "results.json")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="results folders, each with its results.json")
    args = p.parse_args(argv)
    import matplotlib  # noqa: F401 -- re-rendering without plots would drop them: stop here instead
    for folder in args.folders:
        run = json.loads((folder / "results.json").read_text())
        write(run, folder)
        print(f"{folder}: results.md and {len(run['plots'])} plots re-rendered from results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
