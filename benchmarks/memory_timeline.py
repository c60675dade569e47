"""Where a prune's peak memory is: resident memory sampled every 10 ms beside one prune of ``scale.py``'s layers,
each sample charged to the code the main thread was running then (its innermost ``optimum_mosaic`` frames).

    python benchmarks/memory_timeline.py --shape llama3-8b --method default
    python benchmarks/memory_timeline.py --shape tiny --method "uniform SparseGPT"

Prints and writes (``results/memory_<shape>_<method>.json``) the highest resident set per place of the code, sorted,
and the process's peak (VmHWM). Resident memory counts what the allocator holds, so a buffer freed by torch shows
as freed at once (tensors this large are their own mappings). One process, the shape's checkpoint made as in
``scale.py``; run it alone on the machine (the sampler costs nothing measurable, other jobs do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import scale  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def peak_bytes() -> int:
    return status_bytes("VmHWM")


def where(frame, depth: int = 3) -> str:
    """The innermost ``depth`` frames of the package (file:function:line), innermost last."""
    found = []
    while frame is not None and len(found) < depth:
        path = frame.f_code.co_filename
        if "optimum_mosaic" in path:
            found.append(f"{Path(path).stem}.{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(found) or "(outside the package)"


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.main, self.stop = interval, threading.main_thread().ident, threading.Event()
        self.highest: dict[str, tuple[int, float, int]] = {}
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = rss_bytes()
            frame = sys._current_frames().get(self.main)
            place = where(frame) if frame is not None else "?"
            if rss > self.highest.get(place, (0, 0.0, 0))[0]:
                file_backed = status_bytes("RssFile")  # mapped files (a checkpoint's pages), the rest is anonymous
                self.highest[place] = (rss, round(time.perf_counter() - self.start_time, 2), file_backed)
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(scale.SHAPES))
    parser.add_argument("--method", default="default", choices=[m for m, v in scale.METHODS.items() if v is not None])
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="default: results/memory_<shape>_<method>.json")
    args = parser.parse_args(argv)
    from compare_worker import run

    with tempfile.TemporaryDirectory() as tmp:
        model, windows = Path(tmp) / "model", Path(tmp) / "windows.pt"
        scale.make_checkpoint(args.shape, 1, model)
        scale.make_windows(args, windows)
        config = dict(nsamples=args.nsamples, seqlen=args.seqlen, sparsity=args.sparsity, **scale.METHODS[args.method])
        spec = {"model": str(model), "windows": str(windows), "threads": args.threads, "method": args.method,
                "library": "mosaic", "config": config}  # fmt: skip
        baseline = rss_bytes()
        sampler = Sampler()
        sampler.start()
        result = run(spec)
        sampler.stop.set()
        sampler.join()
    places = sorted(sampler.highest.items(), key=lambda kv: -kv[1][0])[: args.top]
    payload = {
        "shape": args.shape, "method": args.method, "tokens": args.nsamples * args.seqlen, "threads": args.threads,
        "prune_s": result.get("prune_s"), "peak_gib": round(peak_bytes() / GIB, 3),
        "rss_before_load_gib": round(baseline / GIB, 3),
        "highest": [
            {"where": p, "rss_gib": round(b / GIB, 3), "file_gib": round(f / GIB, 3), "at_s": t}
            for p, (b, t, f) in places
        ],
    }  # fmt: skip
    for row in payload["highest"]:
        print(f"{row['rss_gib']:7.3f} GiB (files {row['file_gib']:.3f})  t={row['at_s']:8.2f}s  {row['where']}")
    print("peak (VmHWM)", payload["peak_gib"], "GiB; before load", payload["rss_before_load_gib"], "GiB")
    name = re.sub(r"[^a-z0-9]+", "_", args.method.lower()).strip("_")
    out = Path(args.out or Path(__file__).parent / "results" / f"memory_{args.shape}_{name}.json")
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return payload


if __name__ == "__main__":
    main()
