"""Around a GPU slice: the carry folder (data, wheels, a commit stamp) and the exact device command before it;
merging its archive into the checkout and the measured section of `bench/RESULTS.md` after it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import slice_plan as sp
from common.errors import ReproError

REPO = sp.REPO
CARRY = ".data"  # git-ignored; REPRO_DATA_DIR on the device
WHEELS = ".whl"  # git-ignored; wheels for packages the device lacks
STAMP = "slice-stamp.json"
CARRY_LIMIT_MIB = 64  # the device tool sends at most 64 MiB: working tree + carried paths
RESULTS_MD = "bench/RESULTS.md"
BEGIN, END = "<!-- slice-results:begin -->", "<!-- slice-results:end -->"
# import name -> distribution the slice needs on the device (common.train and the benchmarks; no snakemake,
# no `datasets`: parquet files are read with pyarrow)
NEEDED = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "accelerate": "accelerate",
          "numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow", "pyarrow": "pyarrow"}
# the device image's packages, from /work/.library/device/KINDS.md (read on such a machine on 2026-11-17)
DEVICE_PACKAGES = {"accelerate", "numpy", "pillow", "pyarrow", "pyyaml", "timm", "torch", "torchvision", "tqdm",
                   "matplotlib", "pandas", "scipy", "safetensors", "huggingface-hub"}


# ------------------------------------------------------------------------------------------------ stamp
def blob_hash(data: bytes) -> str:
    """git's object id of a file's content (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise ReproError(f"git {' '.join(args)} failed in {root}: {out.stderr.strip()[:200]}; run prepare-carry "
                         "from the git checkout.")
    return out.stdout


def make_stamp(root: Path = REPO) -> dict:
    """HEAD, whether tracked files differ from it, and every tracked file's blob id at HEAD: the device copy has
    no git history, so the slice checks its files against these ids to name the commit it ran."""
    commit = git(root, "rev-parse", "HEAD").strip()
    dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no").strip())
    files = {}
    for line in git(root, "ls-tree", "-r", "HEAD").splitlines():
        meta, path = line.split("\t", 1)
        mode, kind, oid = meta.split()
        if kind == "blob" and mode in ("100644", "100755"):
            files[path] = oid
    return {"git_commit": commit, "git_dirty_at_stamp": dirty,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%MZ"), "files": files}


def verify_stamp(stamp: dict, root: Path) -> dict:
    """git_commit / git_dirty / git_source for a copy of the tree without git, from a stamp."""
    differ = []
    for path, oid in stamp["files"].items():
        try:
            if blob_hash((root / path).read_bytes()) != oid:
                differ.append(path)
        except OSError:
            differ.append(path)
    source = (f"bench.slice stamp of {stamp['date']}: every tracked file matches the commit" if not differ else
              f"bench.slice stamp of {stamp['date']}: {len(differ)} tracked file(s) differ from the commit, "
              f"e.g. {', '.join(differ[:3])}")
    return {"git_commit": stamp["git_commit"], "git_dirty": bool(differ), "git_source": source}


def slice_git_state(root: Path, stamp_path: Path | None) -> dict:
    """The commit a slice runs: from git when the copy has its history, else from the carried stamp."""
    from common.provenance import git_state

    state = git_state(root)
    if state["git_commit"] != "unknown":
        return {**state, "git_source": "git"}
    if stamp_path is not None and stamp_path.is_file():
        return verify_stamp(json.loads(stamp_path.read_text()), root)
    return {"git_commit": "unknown", "git_dirty": None,
            "git_source": "no git history and no stamp (run prepare-carry before the slice)"}


# ---------------------------------------------------------------------------------------- prepare-carry
def travelling_bytes(root: Path, carry: list[str]) -> int:
    """Bytes the device tool sends: tracked and untracked-not-ignored files, plus the carried paths."""
    total = 0
    for rel in git(root, "ls-files", "-co", "--exclude-standard", "-z").split("\0"):
        path = root / rel
        if rel and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    for rel in carry:
        for path in [root / rel, *(root / rel).rglob("*")] if (root / rel).is_dir() else [root / rel]:
            if path.is_file():
                total += path.stat().st_size
    return total


def plan_datasets(plan: sp.Plan, root: Path = REPO) -> list[str]:
    """Dataset names of the plan's experiments (what REPRO_DATA_DIR must hold on the device)."""
    from common import workflow as grid

    names = []
    for comp in plan.comparisons:
        data = grid.load_experiment(comp["paper"], plan.scale, comp["experiment"], root).get("data") or {}
        name = data.get("name", "cifar10-mini")
        if name not in names and not name.endswith("-mini"):  # the -mini samples are committed
            names.append(name)
    return names


def default_data_source(root: Path = REPO) -> Path:
    env = os.environ.get("REPRO_DATA_DIR")
    return Path(env) if env else (root.parent / "shared" / "datasets")


def copy_dataset(src: Path, dest: Path) -> int:
    """Copy a dataset folder (skipping files already there with the same size and mtime); bytes copied."""
    if not src.is_dir():
        raise ReproError(f"dataset folder {src} does not exist; pass --data-src DIR holding {src.name}/ "
                         "(e.g. ../shared/datasets) or set REPRO_DATA_DIR.")
    copied = 0
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        target = dest / path.relative_to(src)
        st = path.stat()
        if target.is_file() and target.stat().st_size == st.st_size and int(target.stat().st_mtime) == int(st.st_mtime):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        os.chmod(target, 0o644)  # the shared copy is read-only; a later refresh must be able to replace it
        copied += st.st_size
    return copied


def download_wheels(specs: list[str], dest: Path) -> None:
    """pip download of Python 3.12 manylinux x86-64 wheels (the device's interpreter), no dependencies."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[x for p in platforms for x in ("--platform", p)], "-d", str(dest), *specs]
    print("$ " + " ".join(command))
    if subprocess.run(command, check=False).returncode != 0:
        raise ReproError(f"pip download of {' '.join(specs)} failed (see above); check the name and version, or add "
                         "another --platform manylinux_2_N_x86_64 as /work/.library/device/README.md says.")


def device_command(minutes: float, carry: list[str], wheels: bool, extra: str = "") -> str:
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
               f"/tmp/site {WHEELS}/*.whl && export PYTHONPATH=/tmp/site || exit; ") if wheels else ""
    return (f"{install}REPRO_DATA_DIR={CARRY} PYTHONUNBUFFERED=1 python3 -m bench.slice --minutes {minutes:g}"
            f"{extra}")


def prepare_carry(argv=None, root: Path = REPO) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.slice prepare-carry",
                                     description="Build the carry folder for a GPU slice and print the device command.")
    parser.add_argument("--plan", default=str(sp.PLAN_FILE))
    parser.add_argument("--data-src", default=None, help="folder holding <dataset>/ (default: $REPRO_DATA_DIR, "
                        "else ../shared/datasets)")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--wheel", action="append", default=[], help="NAME==VERSION to carry as a wheel (repeatable)")
    parser.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB)
    args = parser.parse_args(argv)
    plan = sp.load_plan(args.plan)
    src = Path(args.data_src) if args.data_src else default_data_source(root)
    carry_dir = root / CARRY
    for name in plan_datasets(plan, root):
        copied = copy_dataset(src / name, carry_dir / name)
        print(f"{CARRY}/{name}: {'copied ' + format(copied / 2**20, '.1f') + ' MiB' if copied else 'up to date'} "
              f"(from {src / name})")
    missing = sorted({dist for module, dist in NEEDED.items() if dist not in DEVICE_PACKAGES})
    if missing:
        print(f"the device image lacks {', '.join(missing)}: carry them with --wheel NAME==VERSION")
    if args.wheel:
        download_wheels(args.wheel, root / WHEELS)
    stamp = make_stamp(root)
    (carry_dir / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"{CARRY}/{STAMP}: commit {stamp['git_commit'][:10]}, {len(stamp['files'])} tracked files")
    if stamp["git_dirty_at_stamp"]:
        print("warning: tracked files differ from HEAD; the slice will record its results as from a dirty tree. "
              "Commit first, then run prepare-carry again.")
    wheels = (root / WHEELS).is_dir() and any((root / WHEELS).glob("*.whl"))
    carry = [CARRY, *([WHEELS] if wheels else [])]
    size = travelling_bytes(root, carry)
    print(f"travels: {size / 2**20:.1f} MiB of {args.limit_mib:g} MiB (working tree + {', '.join(carry)})")
    if size > args.limit_mib * 2**20:
        raise ReproError(f"the working tree and {', '.join(carry)} come to {size / 2**20:.1f} MiB, over the device "
                         f"tool's {args.limit_mib:g} MiB: delete untracked files you do not need, or carry fewer wheels.")
    command = device_command(args.minutes, carry, wheels)
    print("\nThe device call (tool `run`), whole:\n")
    print(json.dumps({"command": command, "carry": carry, "timeout_s": 600}, indent=1))
    print("\nThen, here: python -m bench.slice merge <files_at folder of the reply>  (and commit what it lists)")
    return 0


# ------------------------------------------------------------------------------------------------- merge
def _archives(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    found = sorted(source.glob("slice-*.tar.gz")) + sorted(source.glob("*/slice-*.tar.gz"))
    if not found:
        raise ReproError(f"no slice-*.tar.gz in {source}; pass the archive or the folder the device reply named.")
    return found


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not member.isfile():
        raise ReproError(f"archive member {name!r} is not a plain relative file; refusing to unpack this archive.")
    if not (name.startswith(("results/", sp.SLICES_DIR + "/"))):
        raise ReproError(f"archive member {name!r} lies outside results/ and {sp.SLICES_DIR}/; refusing to unpack.")
    if parts[0] == "results" and (len(parts) != 7 or parts[-1] not in
                                   ("metrics.json", "log.jsonl", "config.yaml", "provenance.json")):
        raise ReproError(f"archive member {name!r} is not a run file (results/<paper>/<scale>/<exp>/<method>/"
                         "seed<k>/{metrics.json,log.jsonl,config.yaml,provenance.json}); refusing to unpack.")


def merge(argv=None, root: Path = REPO) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.slice merge",
                                     description="Unpack a slice's archive into the checkout and update bench/RESULTS.md.")
    parser.add_argument("source", help="slice-*.tar.gz, or a folder holding it (the device reply's files_at)")
    args = parser.parse_args(argv)
    added, skipped = [], []
    for archive in _archives(Path(args.source)):
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m)
            runs: dict[str, dict[str, bytes]] = {}
            for m in members:
                data = tar.extractfile(m).read()
                parts = Path(m.name).parts
                if parts[0] == "results":
                    runs.setdefault(str(Path(*parts[:-1])), {})[parts[-1]] = data
                else:
                    target = root / m.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    added.append(m.name)
        for folder, files in sorted(runs.items()):
            if set(files) != {"metrics.json", "log.jsonl", "config.yaml", "provenance.json"}:
                skipped.append(f"{folder}: incomplete in the archive ({', '.join(sorted(files))})")
                continue
            new_hash = json.loads(files["provenance.json"]).get("config_hash")
            have = sp.finished_hash(root / folder)
            if have == new_hash:
                skipped.append(f"{folder}: the checkout already holds this finished run")
                continue
            if have is not None:
                skipped.append(f"{folder}: the checkout holds a finished run of another config (hash {have}, the "
                               f"slice's is {new_hash}); left as it is: move it aside to take the slice's")
                continue
            for name, data in files.items():
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / name).write_bytes(data)
            added.append(folder)
    write_results_md(root)
    for line in skipped:
        print(f"skipped {line}")
    print(f"merged {len(added)} path(s); {RESULTS_MD} updated. Commit them:")
    print("  git add " + " ".join(sorted({p if p.startswith("results/") else str(Path(p).parent) for p in added}
                                      | {RESULTS_MD})))
    return 0


# ------------------------------------------------------------------------------------------ RESULTS.md
def _cell(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return "" if value is None else str(value)


def render_results(root: Path = REPO) -> str:
    """The measured section of bench/RESULTS.md, from every committed slice (newest first), each number with its
    device, commit and date."""
    slices = []
    for record in sorted((root / sp.SLICES_DIR).glob("*/slice.json")):
        data = json.loads(record.read_text())
        data["_dir"] = record.parent
        slices.append(data)
    slices.sort(key=lambda s: s.get("date", ""), reverse=True)
    if not slices:
        return ("No GPU slice has run yet, so none of these targets is measured (`python -m bench.slice --minutes 9` "
                "on a GPU machine, then `python -m bench.slice merge`).")

    def src(s):
        dirty = " (dirty)" if s.get("git_dirty") else ""
        return f"{s['device']} | {str(s['git_commit'])[:10]}{dirty} | {s['date'][:10]}"

    def rows_of(s, name):
        path = s["_dir"] / f"{name}.json"
        return json.loads(path.read_text()).get("rows", []) if path.is_file() else []

    out = ["Generated by `python -m bench.slice merge` from `bench/slices/*/` (do not edit by hand).", "",
           "| slice | device | commit | date | minutes used | benchmarks ok | runs finished |", "|---|---|---|---|---|---|---|"]
    for s in slices:
        ok = [b["name"] for b in s.get("benchmarks", []) if b.get("status") == "ok"]
        done = [r for r in s.get("runs", []) if r.get("status") == "finished"]
        out.append(f"| {s['slice']} | {src(s)} | {s.get('elapsed_s', 0) / 60:.1f} | {', '.join(ok) or '-'} | {len(done)} |")
    sections = [
        ("trainer_vs_plain", "Trainer step vs plain timm loop (ratio >= 1.0: the trainer adds nothing)",
         ["case", "batch", "precision", "plain_img_s", "trainer_img_s", "ratio"]),
        ("method_overhead", "Method step overhead over ERM on the same model (%)",
         ["case", "method", "erm_s_step", "method_s_step", "overhead_pct", "method_peak_mib", "skipped"]),
        ("epoch_time", "Seconds per epoch with the device cache, 1 and k runs packed on one GPU",
         ["config", "method", "packed", "s_per_epoch", "min_per_run", "device_min_per_run"]),
        ("data_path", "Augmented batches per second, DataLoader vs device cache (no model)",
         ["path", "images_per_s", "vs_first", "setup_s"]),
    ]
    for name, title, cols in sections:
        lines = []
        for s in slices:
            for row in rows_of(s, name):
                lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + f" | {src(s)} |")
        if lines:
            out += ["", f"### {title}", "", "| " + " | ".join(cols) + " | device | commit | date |",
                    "|" + "---|" * (len(cols) + 3), *lines]
    runs = []
    for s in slices:
        for r in s.get("runs", []):
            if r.get("status") in ("finished", "killed_projection", "killed_deadline") and "s_per_epoch_wall" in r:
                runs.append(f"| {r['run']} | {r['status']} | {r.get('epochs_done', 0)}/{r['epochs']} | "
                            f"{r['s_per_epoch_wall']:.3g} | {r['mean_packed']:.2g} | {src(s)} |")
    if runs:
        out += ["", "### Runs trained in slices (wall seconds per epoch, evaluation included)", "",
                "| run | status | epochs | s/epoch | runs packed (mean) | device | commit | date |",
                "|---|---|---|---|---|---|---|---|", *runs]
    return "\n".join(out)


def write_results_md(root: Path = REPO) -> None:
    path = root / RESULTS_MD
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ReproError(f"{path} lacks the markers {BEGIN} ... {END} around its measured section; restore them "
                         "from git.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{render_results(root)}\n{END}{tail}")


def check_imports() -> list[str]:
    """Distributions the slice needs that this interpreter cannot import."""
    return sorted(dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None)
