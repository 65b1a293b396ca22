"""Write tests/data/airfoil-mini/airfoil_self_noise.dat: every 5th row of the UCI Airfoil file (301 rows).

    python scripts/make_airfoil_mini.py [--source ../shared/datasets/airfoil/airfoil_self_noise.dat]

The rows are copied byte for byte, so the sample has the original file's format.
"""

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared/datasets/airfoil/airfoil_self_noise.dat"))
    args = parser.parse_args()
    lines = Path(args.source).read_text().splitlines(keepends=True)
    sample = lines[::5]
    out = REPO / "tests/data/airfoil-mini/airfoil_self_noise.dat"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(sample))
    print(f"wrote {len(sample)} of {len(lines)} rows to {out}")


if __name__ == "__main__":
    main()
