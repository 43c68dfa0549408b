"""What a draft saves in greedy answers generated together (llamacpp.greedy_many with `read`) where
reading the draft is extra work: whether the export's reference answers and stop checks should
pass the examples' own answers as drafts, as bench's rows do (bench reads each reference answer
anyway, to score it, so there a draft costs nothing).

For full-depth random-weight models of real shapes (benchmarks/scaling.py's, SmolLM2's vocabulary
and template), at f16 and q4_k_m, the greedy answers to the first --examples prompts of the
bundled extract task (limits as the export's: data.answer_limit), generated three ways, one after
another, alone:

  none    no draft: every answer token decoded a step at a time
  own     the model's own greedy answer as the draft: what a trained model that answers as its
          examples do gets (the most a draft can save)
  labels  the examples' answers, which a random model never gives: what a draft costs when
          nothing of it is taken (its tokens read for nothing)

and prints the seconds of each and whether each way gave the same answers as `none`.

    python benchmarks/drafted_answers.py --sizes smollm2-135m,llama-3.2-1b --work /tmp/drafted

Run it alone on the machine: two heavy jobs on 2 cores slow each other about tenfold.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def answers_three_ways(model: Path, prompts: list[list[int]], limits: list[int], labels: list[list[int]]) -> dict:
    from edgelora.runtime import greedy_answers

    out = {}
    for way in ("none", "own", "labels"):
        drafts = {"none": None, "own": out.get("none", (0, None))[1], "labels": labels}[way]
        start = time.perf_counter()
        answers = greedy_answers(model, prompts, limits, read=drafts)
        out[way] = (time.perf_counter() - start, answers)
    return out


def size_rows(name: str, work: Path, examples: int) -> list[str]:
    import json

    from edgelora.converters.hf_to_gguf import convert
    from edgelora.data import answer_limit
    from edgelora.quantize import quantize
    from edgelora.runtime import load

    hf, f16, q4 = work / name / "model", work / name / "f16.gguf", work / name / "q4_k_m.gguf"
    if not (hf / "params.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--build", name, str(hf)], check=True)
    if not f16.is_file():
        convert(hf, f16, outtype="f16")
    if not q4.is_file():
        quantize(f16, q4, "q4_k_m")
    rows = [json.loads(line) for line in (ROOT / "examples/data/extract_train.jsonl").open()][:examples]
    with load(f16) as rt:
        tokens = [rt.chat_tokens(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]
    prompts, labels = [p for p, _ in tokens], [a for _, a in tokens]
    limits = [answer_limit(len(a)) for a in labels]
    lines = []
    for label, path in (("f16", f16), ("q4_k_m", q4)):
        got = answers_three_ways(path, prompts, limits, labels)
        none_s, plain = got["none"]
        lines.append(f"| {name} | {label} | {sum(map(len, plain))} | " + " | ".join(
            f"{s:.1f} ({none_s / s:.2f}x, {'same' if a == plain else f'{sum(x != y for x, y in zip(a, plain))} differ'})"
            for s, a in (got[w] for w in ("none", "own", "labels"))) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="smollm2-135m,llama-3.2-1b", help="scaling.py's shapes, comma-separated")
    parser.add_argument("--examples", type=int, default=32, help="prompts answered (the export's probe reads 32)")
    parser.add_argument("--work", default="/tmp/drafted", help="models, kept between runs")
    args = parser.parse_args()
    work = Path(args.work)
    header = ["| shape | file | answer tokens | none s | own draft s (speed-up, answers) | labels draft s |",
              "|---|---|---:|---:|---:|---:|"]
    print("\n".join(header), flush=True)
    lines = [line for name in args.sizes.split(",") for line in size_rows(name, work, args.examples)]
    print("\n".join(["", *header, *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
