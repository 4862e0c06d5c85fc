"""Peak memory and time of tokenizing a corpus: token files (streamed, memory-mapped) against the in-memory pipeline.

    python bench/text_data.py                                   # WikiText-2, BPE 4096, new and old pipeline
    python bench/text_data.py --tokenizer byte --repeat 8       # WikiText-2 train x 8 (~86 MB), byte tokens
    python bench/text_data.py --skip-old                        # only the token-file pipeline

Each measurement runs in a fresh Python process (``TextDataModule(...).prepare_data(); .setup("fit")`` on a cold
or a warm cache) and reports its wall time and peak resident memory (``ru_maxrss``), plus the resident memory
after imports only, so the difference is what the data took. "old" is ``lr_lightning/data/text.py`` at the git
revision ``--old-rev`` (default ``HEAD``: the in-memory pipeline, whole splits as Python strings and LongTensors).
With ``--repeat N`` the corpus is a folder whose training file is WikiText-2's repeated N times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WIKITEXT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> None:
    """Child process: build the data module with the chosen pipeline, print one JSON line of figures."""
    import torch  # noqa: F401  (imported before the baseline, as the data module needs it)

    if args.pipeline == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_text", args.old_module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        data_module = module.TextDataModule
    else:
        from lr_lightning.data.text import TextDataModule as data_module
    baseline = peak_rss_mib()
    start = time.perf_counter()
    dm = data_module(path=args.data, tokenizer=args.tokenizer, bpe_vocab_size=args.vocab_size, cache_dir=args.cache)
    dm.prepare_data()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    tokens = {split: len(dm.datasets[split].ids) for split in ("train", "val", "test")}
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "baseline_mib": baseline, "tokens": tokens}))


def run_child(pipeline: str, data: str, cache: Path, args: argparse.Namespace, old_module: Path) -> dict:
    command = [sys.executable, __file__, "--child", pipeline, "--data", data, "--cache", str(cache),
               "--tokenizer", args.tokenizer, "--vocab-size", str(args.vocab_size), "--old-module", str(old_module)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{pipeline} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def repeated_corpus(source: Path, repeat: int, folder: Path) -> Path:
    """A WikiText folder whose train file is ``source``'s repeated ``repeat`` times (written in blocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in WIKITEXT_FILES:
        with open(folder / name, "wb") as out:
            for _ in range(repeat if name == "wiki.train.tokens" else 1):
                with open(source / name, "rb") as file:
                    while block := file.read(1 << 24):
                        out.write(block)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the training file this many times")
    parser.add_argument("--old-rev", default="HEAD", help="git revision of the in-memory text.py")
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--child", choices=("new", "old"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--old-module", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.pipeline, args.data = args.child, str(args.data)
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="text_data_bench_") as scratch:
        scratch = Path(scratch)
        data = repeated_corpus(args.data, args.repeat, scratch / "corpus") if args.repeat > 1 else args.data
        old_module = scratch / "old_text.py"
        show = ["git", "-C", str(REPO), "show", f"{args.old_rev}:lr_lightning/data/text.py"]
        old_module.write_text(subprocess.run(show, capture_output=True, text=True, check=True).stdout)
        size_mb = sum((Path(data) / name).stat().st_size for name in WIKITEXT_FILES) / 1e6
        rows = []
        for pipeline in ("new",) if args.skip_old else ("new", "old"):
            for run in ("first", "cached"):
                figures = run_child(pipeline, str(data), scratch / f"cache-{pipeline}", args, old_module)
                rows.append((pipeline, run, figures))
        print(f"corpus {data} ({size_mb:.1f} MB), tokenizer {args.tokenizer}"
              + (f" {args.vocab_size}" if args.tokenizer == "bpe" else "") + f", train tokens "
              f"{rows[0][2]['tokens']['train']:,}\n")
        print("| pipeline | run | wall s | peak RSS MiB | RSS after imports MiB | data's share MiB |")
        print("|---|---|---|---|---|---|")
        for pipeline, run, f in rows:
            name = "token files (memmap)" if pipeline == "new" else f"in memory ({args.old_rev})"
            print(f"| {name} | {run} | {f['seconds']:.1f} | {f['peak_mib']:.0f} | {f['baseline_mib']:.0f} "
                  f"| {f['peak_mib'] - f['baseline_mib']:.0f} |")


if __name__ == "__main__":
    main()
