#!/usr/bin/env python3
"""Reads labelled word crops with offline recognizers a user can install today and scores them all alike.

Usage: scripts/peers.py [--clip4str target/release/clip4str] DATASET_DIR...

Each DATASET_DIR holds images and `labels.tsv` (`file<TAB>label`), as `../shared/data/CUTE80_288` does. The
recognizers: clip4str (its bundled model, `read --format json`), RapidOCR (PP-OCRv4 recognition shipped in
`pip install rapidocr_onnxruntime`, detection and classification off: the crop is the line) and Tesseract
(`apt-get install tesseract-ocr`, `--psm 7`: one text line). A recognizer that is not installed is skipped
with a note. One scorer for all (test.py's default protocol): prediction and label lower-cased and kept to
[0-9a-z]; labels longer than 25 or empty after that are left out. Prints a markdown table of accuracy (%).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


def normalise(text):
    return re.sub(r"[^0-9a-z]", "", text.lower())


def load_labels(folder):
    rows = []
    for line in (folder / "labels.tsv").read_text(encoding="utf-8").splitlines():
        name, _, label = line.partition("\t")
        label = normalise(label)
        if name and 0 < len(label) <= 25:
            rows.append((folder / name, label))
    return rows


def read_clip4str(binary, paths):
    out = subprocess.run(
        [binary, "read", "--format", "json", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    by_path = {r["path"]: r["text"] for r in map(json.loads, out.splitlines())}
    return [by_path.get(str(p), "") for p in paths]


def read_rapidocr(paths):
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    texts = []
    for path in paths:
        result, _ = engine(str(path), use_det=False, use_cls=False, use_rec=True)
        texts.append(result[0][0] if result else "")
    return texts


def read_tesseract(paths):
    texts = []
    for path in paths:
        out = subprocess.run(
            ["tesseract", str(path), "stdout", "--psm", "7"],
            capture_output=True,
            text=True,
        )
        texts.append(out.stdout.strip())
    return texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip4str", default="target/release/clip4str")
    parser.add_argument("datasets", nargs="+", type=Path)
    args = parser.parse_args()

    readers = {}
    if Path(args.clip4str).exists():
        readers["clip4str (bundled small)"] = lambda paths: read_clip4str(args.clip4str, paths)
    else:
        print(f"note: {args.clip4str} not found; build it first", file=sys.stderr)
    try:
        import rapidocr_onnxruntime  # noqa: F401

        readers["RapidOCR (PP-OCRv4 rec)"] = read_rapidocr
    except ImportError:
        print("note: RapidOCR skipped (pip install rapidocr_onnxruntime)", file=sys.stderr)
    if shutil.which("tesseract"):
        readers["Tesseract (--psm 7)"] = read_tesseract
    else:
        print("note: Tesseract skipped (apt-get install tesseract-ocr)", file=sys.stderr)

    names = [d.name for d in args.datasets]
    print("| recognizer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for reader_name, read in readers.items():
        cells = []
        for folder in args.datasets:
            rows = load_labels(folder)
            preds = read([p for p, _ in rows])
            correct = sum(normalise(p) == label for p, (_, label) in zip(preds, rows))
            cells.append(f"{100 * correct / len(rows):.1f} ({correct}/{len(rows)})")
        print(f"| {reader_name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
