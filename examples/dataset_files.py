"""What the dataset generators (make_*_dataset.py) share: the --out option and writing JSONL."""
import argparse
import json
from pathlib import Path


def output_dir(doc: str) -> Path:
    """The folder to write into: --out, or examples/data beside the scripts."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="folder to write into")
    out = p.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    return out


def distinct(make, n: int, rng) -> list[dict]:
    """The first n different rows make(rng) gives."""
    rows: list[dict] = []
    while len(rows) < n:
        row = make(rng)
        if row not in rows:
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
