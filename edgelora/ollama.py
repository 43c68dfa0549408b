"""What Ollama reads beside a GGUF: a Modelfile (FROM the file, its chat template in Ollama's
Go template language where the run's is ChatML-style, the system prompt, the stop strings), and
for the LoRA route a Modelfile.lora (ADAPTER, which Ollama 0.34.1 and later refuse: its comment
gives the llama.cpp line that runs the pair instead)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .files import atomic_write_text
from .schema import SCHEMA_FILE


def template_parts(source: Optional[str]) -> tuple[Optional[str], Optional[str], list[str]]:
    """(Ollama TEMPLATE, default SYSTEM, stop strings) for a ChatML-style template (<|im_start|>
    role, content, then whatever closes its turns: <|im_end|>, or a base's EOS; the answer may
    open with more, such as a no-think template's empty <think> block); None otherwise."""
    from .templates import render

    if not source or "<|im_start|>" not in source:
        return None, None, []
    rendered = render(source, "the run's chat template", messages=[{"role": "user", "content": "\x00"}],
                      add_generation_prompt=True)
    close = re.search(r"<\|im_start\|>user\n\x00(.+?)\n<\|im_start\|>assistant\n(.*)$", rendered, re.S)
    if close is None:
        return None, None, []
    end, opening = close.group(1), close.group(2)
    m = re.match(rf"<\|im_start\|>system\n(.*?){re.escape(end)}", rendered, re.S)
    template = (f'{{{{- if .System }}}}<|im_start|>system\n{{{{ .System }}}}{end}\n{{{{ end }}}}'
                f'{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}\n{{{{ .Content }}}}{end}\n{{{{ end }}}}'
                '<|im_start|>assistant\n' + opening)
    return template, (m.group(1) if m else None), [end, "<|im_start|>"]


def modelfile_text(model: str, template: Optional[str], system: Optional[str], stops: list[str],
                   adapter: Optional[str] = None, schema: bool = False) -> str:
    lines = []
    if adapter:  # ollama/ollama#14969
        lines += ["# Ollama 0.34.1 and later refuse ADAPTER: with those, build ./Modelfile (the merged file) instead.",
                  f"# This route runs in llama.cpp: {lora_command(model, adapter)}"]
    lines.append(f"FROM {model}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0.2")
    if schema:
        lines += [f"# answers follow {SCHEMA_FILE}: Ollama holds a model to it when a request gives it as \"format\",",
                  f'#   curl localhost:11434/api/chat -d "{{\\"model\\": \\"NAME\\", \\"format\\": $(cat {SCHEMA_FILE}), '
                  '\\"messages\\": [...]}"']
    return "\n".join(lines) + "\n"


def lora_command(base: str, lora: str) -> str:
    """The llama.cpp command that serves the base GGUF with the LoRA GGUF applied."""
    return f"llama-server -m {base} --lora {lora}"


def write_modelfiles(out_dir: Path, main: Path, chat_template: Optional[str], base_file: Optional[Path] = None,
                     lora: Optional[Path] = None, schema: bool = False) -> Optional[list[str]]:
    """Modelfile (FROM `main`) and, given a LoRA GGUF and its base, Modelfile.lora in `out_dir`;
    returns their stop strings, or None where they give no TEMPLATE of their own (Ollama then
    takes the template and stops from the GGUF)."""
    template, system, stops = template_parts(chat_template)
    atomic_write_text(out_dir / "Modelfile", modelfile_text(f"./{main.name}", template, system, stops, schema=schema))
    if lora is not None and base_file is not None:
        atomic_write_text(out_dir / "Modelfile.lora", modelfile_text(
            _relative(base_file, out_dir), template, system, stops, adapter=f"./{lora.name}", schema=schema))
    return stops if template else None


def _relative(path: Path, start: Path) -> str:
    try:
        return "./" + str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())

