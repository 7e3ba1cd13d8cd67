"""Time `digiq import-digiq` on a generated official-format file.

    python benchmarks/import_bench.py                       # 1,000 steps, 64 candidates, q_rep_out [4096]
    python benchmarks/import_bench.py --rep-list            # + q_rep_out_list [64, 4096] per step (1 MiB/step)

The file is built in the exact official shape (tests/fixtures_official.py): numpy image_features [1408],
AutoUI action strings, 64 "<split>"-joined candidates, q_rep_out [4096]; screenshots are synthetic
UI-like PNGs. Only the import is timed (the library call the CLI makes); generation is not.
Prints one JSON object with the timing and the row counts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures_official import official_trajectories, save_official  # noqa: E402


def ui_screenshots(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """Distinct PNGs that compress like app screens: white page, coloured bars and boxes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, size[0], size[1] // 12], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        for _ in range(12):
            x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(size[1] // 10, size[1] - 20))
            draw.rectangle([x0, y0, x0 + int(rng.integers(10, size[0] // 2)), y0 + 18], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw.text((4, 4), f"screen {i}", fill="black")
        path = folder / f"1718747809.{seed}_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def generate(args: argparse.Namespace, root: Path, path: Path) -> None:
    n_traj = -(-args.steps // args.length)
    lengths = [args.length] * n_traj
    lengths[-1] = args.steps - args.length * (n_traj - 1)
    shots = ui_screenshots(root / "images", sum(n + 1 for n in lengths), tuple(args.size), seed=0)
    source = official_trajectories(
        shots, n_traj, lengths=lengths, arrays="numpy", image_dim=args.image_dim,
        candidates=args.candidates, rep_dim=args.rep_dim, rep_list=args.rep_list,
    )  # fmt: skip
    save_official(source, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="steps in the generated file")
    parser.add_argument("--length", type=int, default=10, help="steps per trajectory")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per step in action_list")
    parser.add_argument("--rep-dim", type=int, default=4096, help="width of q_rep_out")
    parser.add_argument("--image-dim", type=int, default=1408, help="width of image_features (BLIP-2: 1408)")
    parser.add_argument("--rep-list", action="store_true", help="also q_rep_out_list [candidates, rep-dim]")
    parser.add_argument("--size", type=int, nargs=2, default=(270, 600), metavar=("W", "H"), help="screenshot size")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the file (default: a temp folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from digiq.importer import ImportOptions, import_official

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        path = root / "digiq_trajectories.pt"
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=generate, args=(args, root, path))
        child.start()  # in another process, so that peak_rss_mib below is the import's alone
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"generating the file failed (exit code {child.exitcode})")
        generated = time.perf_counter() - start

        report = import_official(path, root / "images", root / "out", ImportOptions())
        out_bytes = sum(p.stat().st_size for p in (root / "out").rglob("*") if p.is_file())
        result = {
            "steps": report.steps,
            "trajectories": report.trajectories,
            "candidate_rows": report.candidate_rows,
            "precomputed_rows": report.precomputed_rows,
            "screenshots": report.images,
            "layout": report.layout,
            "import_seconds": round(report.seconds, 2),
            "of_which_torch_load_seconds": round(report.load_seconds, 2),
            "steps_per_second": round(report.steps / report.seconds, 1),
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "dataset_mib": round(out_bytes / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "generation_seconds": round(generated, 1),
            "screenshot_size": list(args.size),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
