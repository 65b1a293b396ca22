"""Write the committed Fashion-MNIST sample (tests/data/fashion-mnist-mini/): the first 600 training and 200 test
images of Debian's copy (`apt-get install dataset-fashion-mnist`), in the original idx format, gzipped.

    python scripts/make_fashion_mnist_mini.py [--source /usr/share/datasets/fashion-mnist]
"""

import argparse
from pathlib import Path

from papers.icm.data import DEBIAN_FASHION, IDX_FILES, MINI_DIR, _idx_folder, read_idx, write_idx

SIZES = {"train": 600, "t10k": 200}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEBIAN_FASHION)
    files = _idx_folder(parser.parse_args().source)
    if files is None:
        raise SystemExit("no Fashion-MNIST idx files there: apt-get install dataset-fashion-mnist")
    MINI_DIR.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        write_idx(MINI_DIR / f"{stem}.gz", read_idx(files[stem])[: SIZES[stem.split("-")[0]]])
        print(MINI_DIR / f"{stem}.gz")
