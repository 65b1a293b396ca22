"""Rebuild the committed samples of C-Mixup's datasets (tests/data/<name>-mini/) from the full copies.

``REPRO_DATA_DIR=/path/to/datasets python scripts/make_cmixup_samples.py``

Lines are copied verbatim (quotes, '?' and all), so the samples exercise the real parsing:

* no2-mini: the header and every 10th row of no2.csv (50 rows);
* exchange_rate-mini: the first 400 days of exchange_rate.txt (the smallest a 168-day window + 12-day horizon
  leaves a few dozen training windows in);
* communities_and_crime-mini: 8 states spread over the state ids, 8 rows each, complete rows first (so the
  police columns, missing in most rows, keep some values): 64 rows, out-of-distribution split 5 / 1 / 2 states;
* skillcraft-mini: the header and the first 6 rows of every league (48 rows; league 8's have '?' fields).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data"


def write(name: str, file: str, lines: list[str]) -> None:
    folder = OUT / f"{name}-mini"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text("".join(line + "\n" for line in lines))
    print(f"{folder / file}: {len(lines)} lines")


def main() -> int:
    root = os.environ.get("REPRO_DATA_DIR")
    if not root:
        print("error: set REPRO_DATA_DIR to the folder holding no2/, exchange_rate/, communities_and_crime/, "
              "skillcraft/", file=sys.stderr)
        return 2
    root = Path(root)
    no2 = (root / "no2" / "no2.csv").read_text().splitlines()
    write("no2", "no2.csv", [no2[0], *no2[1:][::10]])
    series = (root / "exchange_rate" / "exchange_rate.txt").read_text().splitlines()
    write("exchange_rate", "exchange_rate.txt", series[:400])

    crime = (root / "communities_and_crime" / "communities.data").read_text().splitlines()
    by_state: dict[int, list[tuple[bool, int, str]]] = {}
    for number, line in enumerate(crime):
        fields = line.split(",")
        by_state.setdefault(int(fields[0]), []).append(("?" in fields[4:], number, line))
    big = sorted(s for s, rows in by_state.items() if len(rows) >= 8)
    states = [big[round(i * (len(big) - 1) / 7)] for i in range(8)]  # 8 ids spread over the range
    picked = sorted((number, line) for s in states for _, number, line in sorted(by_state[s])[:8])
    write("communities_and_crime", "communities.data", [line for _, line in picked])

    skill = (root / "skillcraft" / "SkillCraft1_Dataset.csv").read_text().splitlines()
    per_league: dict[str, list[str]] = {}
    for line in skill[1:]:
        per_league.setdefault(line.split(",")[1].strip('"'), []).append(line)
    rows = {line for lines in per_league.values() for line in lines[:6]}
    write("skillcraft", "SkillCraft1_Dataset.csv", [skill[0], *[line for line in skill[1:] if line in rows]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
