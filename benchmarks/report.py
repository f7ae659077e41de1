"""Markdown tables (and plots, when matplotlib is installed) from the stored benchmark results.

    python -m benchmarks.report                         # every results/<device>/<subject>.jsonl
    python -m benchmarks.report --subject moe --no-plots

With matplotlib installed it also writes PNG plots beside the results (results/<device>/<subject>_<dtype>_<mode>.png).

Rows are keyed by (device, subject, dtype, mode, shape, provider); when a key was measured more than once the latest
row wins. One table per (device, subject, dtype, mode), ordered by the swept size, providers side by side.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/report.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import DEFAULT_OUT, slug

COLUMNS = (  # (header, row field, format)
    ("ms", "ms", "{:.4g}"),
    ("TFLOP/s", "tflops", "{:.4g}"),
    ("x dense", "vs_dense", "{:.2f}"),
    ("GB/s", "gbps", "{:.4g}"),
    ("x copy", "vs_copy", "{:.2f}"),
    ("x baseline", "vs_baseline", "{:.2f}"),
    ("peak MiB", "peak_mb", "{:.0f}"),
    ("act MiB", "activation_mb", "{:.0f}"),
)


def load(results_dir: Path, subject: str | None = None) -> list[dict]:
    """Latest row per (device, subject, dtype, mode, shape, provider) from every results/*/*.jsonl."""
    latest: dict[tuple, dict] = {}
    for path in sorted(results_dir.glob("*/*.jsonl")):
        if subject and path.stem != subject:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON row ({e})") from None
            key = (
                row["device"],
                row["subject"],
                row["dtype"],
                row["mode"],
                json.dumps(row["shape"], sort_keys=True),
                row["provider"],
            )
            if key not in latest or row["timestamp"] >= latest[key]["timestamp"]:
                latest[key] = row
    return list(latest.values())


def tables(rows: list[dict]) -> str:
    """Markdown: one table per (device, subject, dtype, mode)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["subject"], r["dtype"], r["mode"])].append(r)
    out = []
    for (device, subject, dtype, mode), group in sorted(groups.items()):
        sweep = group[0].get("sweep")
        fixed = {
            k: v for k, v in group[0]["shape"].items() if k != sweep and all(r["shape"].get(k) == v for r in group)
        }
        commits = sorted({r["git_commit"] for r in group})
        v = group[0]["versions"]
        out.append(f"### {subject} / {mode} / {dtype} on {device}")
        out.append("")
        out.append(
            f"{' '.join(f'{k}={x}' for k, x in fixed.items())}; torch {v.get('torch')}, triton "
            f"{v.get('triton')}, transformers {v.get('transformers')}; commit {', '.join(commits)}; "
            f"copy {group[0]['copy_gbps']:.0f} GB/s"
        )
        out.append("")
        varying = [k for k in group[0]["shape"] if k not in fixed]
        out.append("| " + " | ".join([*varying, "provider", *(c[0] for c in COLUMNS), "status"]) + " |")
        out.append("|" + "---|" * (len(varying) + len(COLUMNS) + 2))
        order = {p: i for i, p in enumerate(dict.fromkeys(r["provider"] for r in group))}
        for r in sorted(group, key=lambda r: ([r["shape"].get(k) for k in varying], order[r["provider"]])):
            cells = [str(r["shape"].get(k)) for k in varying] + [r["provider"]]
            cells += ["" if r.get(field) is None else fmt.format(r[field]) for _, field, fmt in COLUMNS]
            cells.append(r["status"] if r["status"] != "ok" else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plots(rows: list[dict], results_dir: Path) -> list[Path]:
    """TFLOP/s and speed-up over the baseline against the swept size, per (device, subject, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get("sweep"):
            groups[(r["device"], r["subject"], r["dtype"], r["mode"])].append(r)
    written = []
    for (device, subject, dtype, mode), group in sorted(groups.items()):
        sweep = group[0]["sweep"]
        fig, (ax_rate, ax_speedup) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider in dict.fromkeys(r["provider"] for r in group):
            points = sorted(
                (r["shape"][sweep], r["tflops"], r["vs_baseline"]) for r in group if r["provider"] == provider
            )
            xs = [p[0] for p in points]
            ax_rate.plot(xs, [p[1] for p in points], marker="o", label=provider)
            ax_speedup.plot(xs, [p[2] for p in points], marker="o", label=provider)
        for ax, label in ((ax_rate, "TFLOP/s"), (ax_speedup, "speed-up over baseline")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{subject} {mode} {dtype} on {device}")
        fig.tight_layout()
        path = results_dir / slug(device) / f"{subject}_{dtype}_{mode}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables and plots from benchmarks/results")
    p.add_argument("results", nargs="?", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--subject", help="only this subject (e.g. moe)")
    p.add_argument("--no-plots", action="store_true", help="tables only, even when matplotlib is installed")
    args = p.parse_args(argv)
    rows = load(args.results, args.subject)
    if not rows:
        print(f"no results under {args.results}", file=sys.stderr)
        return 1
    print(tables(rows))
    if not args.no_plots:
        try:
            written = plots(rows, args.results)
        except ImportError:
            print("matplotlib is not installed: tables only (pip install matplotlib for plots)", file=sys.stderr)
        else:
            for path in written:
                print(f"plot: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
