"""An Ollama Modelfile for an exported GGUF: `ollama create NAME -f OUT.Modelfile`.

Ollama wants its prompt template in Go's template language, not Jinja. The common chat formats (ChatML,
Llama 3 headers, Llama 2 [INST]) are recognised by their marker tokens and written by hand; any other
model gets a plain continuation template (the prompt as it is), which is right for base models.
"""
from __future__ import annotations

CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
LLAMA3 = ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
          "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>")
LLAMA2 = ("[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] "
          "{{ .Response }}")
PLAIN = "{{ .Prompt }}{{ .Response }}"
_NEEDS_QUOTES = (" ", "\n", '"')


def template_and_stops(chat_template: str | None, eos: str | None) -> tuple[str, str, list[str]]:
    """(format name, Go template, stop strings) for a Jinja chat template (or none)."""
    jinja = chat_template or ""
    if "<|im_start|>" in jinja:
        name, template, stops = "chatml", CHATML, ["<|im_start|>", "<|im_end|>"]
    elif "<|start_header_id|>" in jinja:
        name, template, stops = "llama3", LLAMA3, ["<|start_header_id|>", "<|eot_id|>"]
    elif "[INST]" in jinja:
        name, template, stops = "llama2", LLAMA2, ["[INST]", "[/INST]"]
    else:
        name, template, stops = "plain", PLAIN, []
    if eos and eos not in stops:
        stops.append(eos)
    return name, template, stops


def _quoted(text: str) -> str:
    # A Modelfile value in triple quotes ends at the first `"""`; a licence text must not end it early.
    return '"""' + text.replace('"""', "'''") + '"""'


def licence_text(licence: dict, base_licence_file: str | None) -> str | None:
    """The base model's licence text when its folder has one, else the licence's name and plain summary."""
    if base_licence_file:
        return base_licence_file
    if not licence:
        return None
    head = " ".join(str(x) for x in (licence.get("name"), f"({licence['licence_id']})"
                                     if licence.get("licence_id") else None) if x)
    parts = [p for p in (head, licence.get("summary"), licence.get("warning")) if p]
    return "\n\n".join(parts) or None


def modelfile(gguf_name: str, chat_template: str | None, eos: str | None, licence: str | None) -> str:
    _, template, stops = template_and_stops(chat_template, eos)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template)}"]
    lines += ["PARAMETER stop " + (_quoted(s) if any(c in s for c in _NEEDS_QUOTES) else s) for s in stops]
    if licence:
        lines.append(f"LICENSE {_quoted(licence)}")
    return "\n".join(lines) + "\n"
