"""The Python API end to end: train an adapter, export GGUF files, load one and ask it something.

Trains QLoRA on the bundled extraction task (examples/data/extract_train.jsonl) on the embedded
SmolLM2-135M, exports a merged q4_k_m GGUF plus the adapter as a LoRA GGUF, and answers a
held-out question from extract_eval.jsonl through llama.cpp (no torch at that point).

    python examples/python_api.py                         # 40 steps, about 5 minutes on 2 CPU cores
    python examples/python_api.py --out runs/api --steps 4
"""
import argparse
import json
from pathlib import Path

import edgelora

DATA = Path(__file__).resolve().parent / "data"

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="runs/python-api", help="run directory (replaced if it exists)")
p.add_argument("--steps", type=int, default=40, help="optimizer steps")
a = p.parse_args()

run = edgelora.train(data=str(DATA / "extract_train.jsonl"), out=a.out, base="smollm2-135m", method="qlora",
                     max_steps=a.steps, batch_size=8, lr=1e-3, seq_len=256, force=True)
print(f"trained {run.summary.steps} steps, final loss {run.summary.final_loss:.4f}")

# The importance matrix is measured on the run's training data; 8192 tokens keep this example quick.
exported = edgelora.export(a.out, quants=["q4_k_m"], lora_gguf=True, force=True, imatrix_tokens=8192)
for f in exported.files:
    print(f"exported {f.role}: {exported.out_dir / f.file} ({f.bpw:.2f} bits/weight)")

merged = next(f for f in exported.files if str(f.role) == "merged:q4_k_m")
model = edgelora.load(exported.out_dir / merged.file, device="cpu")
held_out = json.loads((DATA / "extract_eval.jsonl").read_text().splitlines()[0])
question = held_out["messages"][0]["content"]
print(f"question: {question!r}\nexpected: {held_out['messages'][1]['content']}")
print(f"answer:   {model.chat([{'role': 'user', 'content': question}], max_tokens=40)}")
