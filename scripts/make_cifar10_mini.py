"""Write the committed CIFAR-10 sample `tests/data/cifar10-mini/` from a full parquet copy.

A balanced, seeded sample: 100 images per class from train (1,000) and 20 per class from test
(200). Rows are copied with `Table.take`, so the JPEG bytes, the `img.path` strings and the Hugging
Face feature metadata are exactly those of the source (no re-encoding).

Usage:
    python scripts/make_cifar10_mini.py [--source ../shared/datasets/cifar10] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "datasets" / "cifar10"
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "cifar10-mini"
PER_CLASS = {"train": 100, "test": 20}
# sha256 of the full copy this sample was first drawn from (/work/shared/datasets/README.md).
KNOWN_SOURCE_SHA256 = {
    "train": "6161e4872651fffda5580540da4e4487c2a3f7a5bf939a718d1cbedfb3876d7e",
    "test": "68ab8e8941ccc1e7ad9d63deef4d6d7b152288bcf8b74a5f7b05efb96270f445",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` row indices of each class drawn without replacement, returned in file order."""
    picked = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        if len(rows) < per_class:
            sys.exit(f"class {cls} has only {len(rows)} rows, fewer than the {per_class} asked for")
        picked.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with train/test.parquet")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class draw")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, per_class in PER_CLASS.items():
        src = args.source / f"{split}.parquet"
        if not src.is_file():
            sys.exit(
                f"{src} not found; pass --source pointing to a folder with train.parquet and test.parquet"
            )
        digest = sha256(src)
        if digest != KNOWN_SOURCE_SHA256[split]:
            print(f"warning: {src} sha256 {digest} differs from the documented copy", file=sys.stderr)
        table = pq.read_table(src)
        labels = table.column("label").to_numpy()
        sample = table.take(balanced_indices(labels, per_class, rng))
        dst = args.out / f"{split}.parquet"
        pq.write_table(sample, dst)  # schema and its Hugging Face metadata come with the table
        size = dst.stat().st_size
        print(f"{dst}: {sample.num_rows} rows, {size / 1024:.0f} KiB")
        lines.append(
            f"| {split} | {sample.num_rows} | {per_class} | `{digest}` | `{sha256(dst)}` | {size:,} |"
        )

    readme = f"""# cifar10-mini

A balanced sample of CIFAR-10 (JPEG copy) for tests and smoke runs: 100 images per class from the
training set and 20 per class from the test set, drawn with `numpy.random.default_rng({args.seed})`
(train first, then test; rows kept in source order). Same columns and Hugging Face metadata as
the full copy (`img` = struct of JPEG `bytes` and `path`, `label` int64); the JPEG bytes are copied
untouched. Load it with `common.data.build_datasets("cifar10-mini")`.

Made with:

    python scripts/make_cifar10_mini.py --source <folder with the full train/test.parquet> --seed {args.seed}

| split | rows | per class | source sha256 | file sha256 | bytes |
|---|---|---|---|---|---|
{chr(10).join(lines)}

The source is the CIFAR-10 parquet copy described in `../shared/datasets/README.md` (re-encoded
JPEG, quality about 75, so pixels differ from the original CIFAR-10 arrays).
"""
    (args.out / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
