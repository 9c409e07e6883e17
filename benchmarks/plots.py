"""PNG plots of a benchmark document: per size, latency and throughput vs batch, one line per backend."""
from __future__ import annotations

from pathlib import Path
from typing import List


def write_plots(doc: dict, stem: Path) -> List[Path]:
    """`stem`-SIZE.png per input size (rows: p50 latency, images/s; columns: heads). Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipfuse.runtime.fileio import atomic_path

    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    labels = {r["backend"]: r.get("label", r["backend"]) for r in ok}
    written = []
    for size in sorted({r["size"] for r in ok}):
        heads = [h for h in doc["config"]["heads"] if any(r["head"] == h and r["size"] == size for r in ok)]
        fig, axes = plt.subplots(2, len(heads), figsize=(3.6 * len(heads), 6.4), squeeze=False)
        for col, head in enumerate(heads):
            for backend in labels:
                pts = sorted((r["batch"], r["latency"]) for r in ok
                             if r["head"] == head and r["size"] == size and r["backend"] == backend)
                if not pts:
                    continue
                batches = [b for b, _ in pts]
                axes[0, col].plot(batches, [lat["p50_s"] * 1e3 for _, lat in pts], marker="o", label=labels[backend])
                axes[1, col].plot(batches, [lat["images_per_s"] for _, lat in pts], marker="o",
                                  label=labels[backend])
            axes[0, col].set_title(f"{head} @ {size}")
            axes[0, col].set_ylabel("p50 latency per call (ms)")
            axes[1, col].set_ylabel("images / s")
            for ax in axes[:, col]:
                ax.set_xlabel("batch")
                ax.set_xscale("log", base=2)
                ax.set_xticks(doc["config"]["batches"], [str(b) for b in doc["config"]["batches"]])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
        cfg = doc["config"]
        cpu = doc["machine"].get("cpu_model", "")
        gpu = (doc["machine"].get("gpu") or {}).get("name")
        fig.suptitle(f"clipfuse {cfg['model']} {size}x{size}, scope {cfg['scope']} - {gpu or cpu}", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.96))
        path = Path(f"{stem}-{size}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written
