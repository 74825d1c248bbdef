"""The README.md model card written next to exported models (Hugging Face card format)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

SCRATCH_LICENCE = "licence-free (choose your own)"


def _yaml_str(value: str) -> str:
    # A JSON string is a valid double-quoted YAML scalar: safe for colons, quotes and unicode.
    return json.dumps(value, ensure_ascii=False)


def _hub_licence_id(licence: dict) -> str:
    """The card's `license:` value: the base's id in the hub's lowercase style, else "other"."""
    ident = str(licence.get("licence_id") or "").strip().lower()
    if ident and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", ident) and ident not in ("unknown", "none", "other"):
        return ident
    return "other"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "(none)"
    if value is None:
        return "default"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(*, base_model: str, licence: dict, datasets: list[str], hyperparameters: dict, eval: dict,
               method: str, created: str) -> str:
    scratch = base_model.startswith("scratch:") or licence.get("klass") == "scratch"
    front = ["---", f"license: {'other' if scratch else _hub_licence_id(licence)}"]
    if not scratch:
        front.append(f"base_model: {_yaml_str(base_model)}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- modron", "---", ""]

    title = (f"A `{base_model.split(':', 1)[1]}` model trained from scratch with Modron" if scratch
             else f"{base_model.split('/')[-1]} finetuned with Modron")
    lines = [f"# {title}", "",
             f"Trained with Modron using **{method}** on {created}.", ""]

    lines += ["## Base model", ""]
    if scratch:
        lines += [f"Trained from scratch: the `{base_model.split(':', 1)[1]}` preset of Modron "
                  "(a small Llama-style architecture), starting from random weights.", ""]
    else:
        lines += [f"`{base_model}`", ""]

    lines += ["## Licence", ""]
    if scratch:
        lines += [f"**{SCRATCH_LICENCE}.** These weights were not derived from anyone else's model, "
                  "so no model licence applies; you decide how to license them. "
                  "The licences of your training data may still matter.", ""]
    else:
        name = licence.get("name") or licence.get("licence_id") or "unknown"
        lines += [f"**{name}** (class: {licence.get('klass') or 'unknown'}"
                  + (f", found in {licence['source']}" if licence.get("source") else "") + ").", ""]
        lines += ["A finetuned model is a derivative of its base model, so the base model's licence "
                  "applies to these weights too.", ""]
        if licence.get("summary"):
            lines += [str(licence["summary"]), ""]
        if licence.get("warning"):
            lines += [f"> **Warning:** {licence['warning']}", ""]

    lines += ["## Training data", ""]
    lines += [f"- `{d}`" for d in datasets] or ["(not recorded)"]
    lines += [""]

    lines += ["## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {_cell(str(k))} | {_cell(_fmt(v))} |" for k, v in hyperparameters.items()]
    lines += [""]

    lines += ["## Evaluation", ""]
    loss = eval.get("eval_loss") if eval else None
    ppl = eval.get("perplexity") if eval else None
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        lines += [f"- final eval loss: {loss:.4f}"]
        if isinstance(ppl, (int, float)) and math.isfinite(ppl):
            lines += [f"- perplexity: {ppl:.2f}"]
        lines += ["", "Measured on a held-out part of the training data, so it says how well the model "
                      "fits data like it, not how good it is in general.", ""]
    else:
        lines += ["No evaluation was recorded for this checkpoint.", ""]
    return "\n".join(front + lines)
