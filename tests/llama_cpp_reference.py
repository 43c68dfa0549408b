"""Run llama.cpp's own convert_hf_to_gguf.py (from its source tree ROOT) on a tiny test model:

    python tests/llama_cpp_reference.py ROOT PRE MODEL_DIR [converter options]

llama.cpp names a BPE pre-tokenizer by hashing the tokens of a test string against a table of
published models; a tokenizer trained for the tests is in no table, so the name is given (PRE, as
edgelora detected it). Everything else is llama.cpp's code as released."""
import os
import runpy
import sys

root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [os.path.join(root, "gguf-py"), root]
from conversion import base  # noqa: E402  (llama.cpp's, found through the path above)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [os.path.join(root, "convert_hf_to_gguf.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
