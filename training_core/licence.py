"""The licence guard: what the licence of the model you start from means for what you train.

Reads the `license:` key of the model card's front matter (README.md) and any LICENSE
file, and sorts the result into a few classes that a hobbyist can act on. This is a
plain-words guide, not legal advice; the summaries say so where it matters.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASSES = ("licence-free", "permissive", "share-alike", "non-commercial", "use-restricted",
           "revocable", "unknown")

# How cautious each class makes you: with several licences, the strictest one is shown.
_STRICTNESS = {"licence-free": 0, "permissive": 1, "share-alike": 2, "use-restricted": 3,
               "non-commercial": 4, "unknown": 5, "revocable": 6}

SUMMARIES = {
    "licence-free": "You own what you train from scratch: choose any licence you like for it "
                    "(the licences of your training data may still apply).",
    "permissive": "You may use, change and share the model you train, also commercially. Keep the "
                  "original licence and copyright notice with it.",
    "share-alike": "You may use and share the model you train, also commercially, but whatever you "
                   "share must be released under the same licence.",
    "non-commercial": "You may train and share this model, but neither it nor anything you train "
                      "from it may be used commercially.",
    "use-restricted": "You may train and share this model, also commercially in most cases, but the "
                      "licence forbids some uses, and you must pass those restrictions on to anyone "
                      "you share your model with. Read the licence before you share.",
    "revocable": "The licence lets its owner take back your right to use the model at any time: "
                 "anything you train from it could become unusable. Avoid building on it for "
                 "anything you want to keep.",
    "unknown": "No licence could be found for this model. Check the model's page before you use "
               "or share what you train from it.",
}

WARNINGS = {
    "non-commercial": "Non-commercial licence: nothing you train from this model may be used commercially.",
    "use-restricted": "Use-restricted licence: some uses are forbidden, and the restrictions carry over "
                      "to what you train.",
    "revocable": "Revocable licence: the owner can withdraw your right to use this model and "
                 "anything trained from it.",
    "unknown": "Unknown licence: check the model's page before you use or share what you train.",
}

# Hub licence ids (the `license:` values the Hugging Face hub offers) -> (class, name).
_IDS: dict[str, tuple[str, str]] = {}


def _add(klass: str, names: dict[str, str]) -> None:
    for key, name in names.items():
        _IDS[key] = (klass, name)


_add("permissive", {
    "apache-2.0": "Apache 2.0", "mit": "MIT", "mit-0": "MIT No Attribution", "bsd": "BSD",
    "bsd-2-clause": "BSD 2-Clause", "bsd-3-clause": "BSD 3-Clause", "bsd-3-clause-clear": "BSD 3-Clause Clear",
    "isc": "ISC", "unlicense": "The Unlicense", "cc0-1.0": "CC0 1.0", "zlib": "zlib", "bsl-1.0": "Boost 1.0",
    "afl-3.0": "Academic Free License 3.0", "artistic-2.0": "Artistic 2.0", "ecl-2.0": "Educational Community 2.0",
    "wtfpl": "WTFPL", "postgresql": "PostgreSQL", "ncsa": "NCSA", "pddl": "ODC Public Domain",
    "odc-by": "ODC Attribution", "cdla-permissive-1.0": "CDLA Permissive 1.0",
    "cdla-permissive-2.0": "CDLA Permissive 2.0", "etalab-2.0": "Etalab 2.0", "ms-pl": "Microsoft Public",
    "lppl-1.3c": "LaTeX Project 1.3c", "apple-ascl": "Apple Sample Code", "openmdw-1.0": "OpenMDW 1.0",
})
_add("share-alike", {
    "gpl": "GPL", "gpl-2.0": "GPL 2.0", "gpl-3.0": "GPL 3.0", "agpl-3.0": "AGPL 3.0", "lgpl": "LGPL",
    "lgpl-2.1": "LGPL 2.1", "lgpl-3.0": "LGPL 3.0", "lgpl-lr": "LGPL for Linguistic Resources",
    "mpl-2.0": "Mozilla Public 2.0", "odbl": "Open Database License", "cdla-sharing-1.0": "CDLA Sharing 1.0",
    "epl-1.0": "Eclipse 1.0", "epl-2.0": "Eclipse 2.0", "eupl-1.1": "EUPL 1.1", "eupl-1.2": "EUPL 1.2",
    "gfdl": "GNU Free Documentation", "osl-3.0": "Open Software 3.0", "ofl-1.1": "SIL Open Font 1.1",
})
_add("non-commercial", {
    "fair-noncommercial-research-license": "FAIR Noncommercial Research",
    "deepfloyd-if-license": "DeepFloyd IF", "apple-amlr": "Apple Machine Learning Research",
    "intel-research": "Intel Research", "h-research": "Research-only",
    "qwen-research": "Qwen Research", "mrl": "Mistral Research", "mistral-research-license": "Mistral Research",
    "sai-nc-community": "Stability AI Non-Commercial Community",
    "nvidia-one-way-noncommercial-license": "NVIDIA Non-Commercial",
})
_add("use-restricted", {
    "openrail": "OpenRAIL", "openrail++": "OpenRAIL++-M", "creativeml-openrail-m": "CreativeML OpenRAIL-M",
    "bigscience-openrail-m": "BigScience OpenRAIL-M", "bigscience-bloom-rail-1.0": "BigScience BLOOM RAIL 1.0",
    "bigcode-openrail-m": "BigCode OpenRAIL-M",
    "llama2": "Llama 2 Community License", "llama3": "Llama 3 Community License",
    "llama3.1": "Llama 3.1 Community License", "llama3.2": "Llama 3.2 Community License",
    "llama3.3": "Llama 3.3 Community License", "llama4": "Llama 4 Community License",
    "gemma": "Gemma Terms of Use",
    # Seen as `license: other` with `license_name:`; these carry use-based restrictions.
    "deepseek": "DeepSeek License", "deepseek-license": "DeepSeek License",
    "tongyi-qianwen": "Tongyi Qianwen License", "falcon-llm-license": "Falcon LLM License",
    "stabilityai-ai-community": "Stability AI Community License",
    "nvidia-open-model-license": "NVIDIA Open Model License",
})

# Extra sentences for licences whose catch is not obvious from the class.
_EXTRA = {
    "llama": "Meta's licence also requires naming (\"Built with Llama\") and a separate licence for "
             "services with over 700 million monthly users.",
    "no-derivatives": "It also forbids sharing changed versions: you may not share a model you train from it.",
}


@dataclass
class LicenceInfo:
    klass: str
    licence_id: str | None
    name: str | None
    source: str            # "README.md front matter", "LICENSE file", "preset", ...
    summary: str
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _make(klass: str, licence_id: str | None, name: str | None, source: str,
          note: str | None = None) -> LicenceInfo:
    summary = SUMMARIES[klass]
    key = (licence_id or "").lower()
    if key.startswith("llama"):
        summary += " " + _EXTRA["llama"]
    if re.search(r"(^|-)nd(-|$)", key):
        summary += " " + _EXTRA["no-derivatives"]
    if note:
        summary += " " + note
    warning = WARNINGS.get(klass)
    if warning and name and klass != "unknown":
        warning = warning.replace(" licence:", f" licence ({name}):", 1)
    return LicenceInfo(klass=klass, licence_id=licence_id, name=name, source=source,
                       summary=summary, warning=warning)


# --- classification ------------------------------------------------------------------------

def _cc_name(key: str) -> str:
    # "cc-by-nc-sa-4.0" -> "CC BY-NC-SA 4.0"
    m = re.fullmatch(r"cc-([a-z-]+?)-(\d\.\d)", key)
    return f"CC {m.group(1).upper()} {m.group(2)}" if m else key


def _classify_id(licence_id: str | None) -> tuple[str, str] | None:
    if not licence_id:
        return None
    key = licence_id.strip().lower()
    if key in _IDS:
        return _IDS[key]
    if key.startswith("cc-by"):
        if "-nc" in key:
            return "non-commercial", _cc_name(key)
        if "-nd" in key:
            return "use-restricted", _cc_name(key)    # no derivatives: you may not share your finetune
        if "-sa" in key:
            return "share-alike", _cc_name(key)
        return "permissive", _cc_name(key)
    for prefix, klass, name in (("gpl-", "share-alike", "GPL"), ("agpl-", "share-alike", "AGPL"),
                                ("lgpl-", "share-alike", "LGPL"), ("bsd-", "permissive", "BSD"),
                                ("llama", "use-restricted", "Llama Community License")):
        if key.startswith(prefix):
            return klass, f"{name} ({licence_id})"
    return None


def _normalise(text: str) -> str:
    text = re.sub(r"<[^>]{1,40}>", " ", text)          # <br>, <h2 ...> in markdown licences
    text = re.sub(r"[*_`#>]+", " ", text)               # markdown emphasis and headings
    text = text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).lower()


_AT_WILL = re.compile(r"\bat any time\b|\bfor any reason\b|\bwithout cause\b|\bfor convenience\b|"
                      r"\b(?:in|at) (?:its|our|their) sole discretion\b")
_ENDS = re.compile(r"\b(?:may|can|could|reserves? the right to)\s+(?:\w+\s+){0,2}?"
                   r"(?:terminate|revoke|suspend|cancel)\b")
_CONDITIONAL = re.compile(r"\bif you\b|\bbreach|\bfail(?:s|ure)? to comply|\bviolat|\bnon-?compliance")


def _is_revocable(text: str) -> bool:
    """The licensor may end the licence at will (not merely when you break it)."""
    if re.search(r"(?<!non-)(?<!non )(?<!not )\brevocable\b", text):   # "revocable ... license"; not "irrevocable"
        return True
    for sentence in re.split(r"[.;]\s", text):
        m = _ENDS.search(sentence)
        if not m or not _AT_WILL.search(sentence) or _CONDITIONAL.search(sentence):
            continue
        # "You may terminate this License at any time by destroying..." is the user's own choice.
        subject = sentence[:m.start()].split()[-1:] or [""]
        if subject[0] not in ("you", "licensee"):
            return True
    return False


_NC_BOTH = re.compile(r"commercial\s*(?:and|or|&|/)\s*non-?\s?commercial|non-?\s?commercial\s*(?:and|or|&|/)\s*commercial")

# Restrictions count wherever they appear in the text (strictest first).
_RESTRICTIONS: list[tuple[str, re.Pattern[str]]] = [
    ("non-commercial", re.compile(
        r"\bnon-?\s?commercial\s+(?:use|uses|purpose|purposes|research|licen[cs]e|only|basis)\b|"
        r"attribution-non-?commercial|research purposes only|solely for (?:your )?(?:non-commercial )?research|"
        r"not for commercial|no commercial use|may not (?:be )?use[d]? [^.]{0,60}for commercial")),
    ("use-restricted", re.compile(
        r"you agree not to use|\buse restrictions\b|acceptable use policy|prohibited use policy|"
        r"\bprohibited uses\b|use-based restrictions|responsible ai licen[cs]e")),
]

# Open licences: the one named first is the licence; later ones are usually third-party notices.
_OPEN: list[tuple[str, str, re.Pattern[str]]] = [
    ("share-alike", "AGPL 3.0", re.compile(r"gnu affero general public licen[cs]e")),
    ("share-alike", "LGPL", re.compile(r"gnu lesser general public licen[cs]e|gnu library general public")),
    ("share-alike", "GNU Free Documentation", re.compile(r"gnu free documentation licen[cs]e")),
    ("share-alike", "GPL", re.compile(r"gnu general public licen[cs]e")),
    ("share-alike", "Mozilla Public", re.compile(r"mozilla public licen[cs]e")),
    ("share-alike", "SIL Open Font 1.1", re.compile(r"sil open font licen[cs]e")),
    ("share-alike", "CC BY-SA", re.compile(r"attribution-sharealike|\bsharealike\b")),
    ("share-alike", "Open Database License", re.compile(r"open database licen[cs]e")),
    ("permissive", "Apache 2.0", re.compile(r"apache licen[cs]e,? version 2\.0")),
    ("permissive", "MIT", re.compile(r"permission is hereby granted, free of charge")),
    ("permissive", "ISC", re.compile(r"permission to use, copy, modify, and(?:/or)? distribute this software "
                                     r"for any purpose with or without fee")),
    ("permissive", "BSD", re.compile(r"redistribution and use in source and binary forms")),
    ("permissive", "The Unlicense", re.compile(r"free and unencumbered software released into the public domain")),
    ("permissive", "CC0 1.0", re.compile(r"\bcc0 1\.0\b|creative commons zero")),
    ("permissive", "CC BY 4.0", re.compile(r"\battribution 4\.0 international\b")),
    ("permissive", "Artistic", re.compile(r"\bartistic licen[cs]e")),
    ("permissive", "Boost 1.0", re.compile(r"boost software licen[cs]e")),
    ("permissive", "zlib", re.compile(r"altered source versions must be plainly marked")),
]

# Names of well-known licences, for a readable name when the text decides.
_TEXT_NAMES = [
    (re.compile(r"opt-175b licen[cs]e"), "OPT-175B License"),
    (re.compile(r"llama (\d(?:\.\d)?) community licen[cs]e"), "Llama {0} Community License"),
    (re.compile(r"gemma terms of use"), "Gemma Terms of Use"),
    (re.compile(r"creativeml open ?rail-m"), "CreativeML OpenRAIL-M"),
    (re.compile(r"bigscience (?:bloom )?rail"), "BigScience RAIL"),
    (re.compile(r"open ?rail"), "OpenRAIL"),
    (re.compile(r"deepseek licen[cs]e"), "DeepSeek License"),
    (re.compile(r"fair noncommercial research licen[cs]e"), "FAIR Noncommercial Research"),
]


def _text_name(text: str) -> str | None:
    for pattern, name in _TEXT_NAMES:
        m = pattern.search(text)
        if m:
            return name.format(*m.groups())
    return None


def _classify_text(text: str) -> tuple[str, str | None]:
    t = _normalise(text)
    known = _text_name(t)
    if _is_revocable(t):
        return "revocable", known
    nc_text = _NC_BOTH.sub(" ", t)   # "commercial and non-commercial use" grants, not limits
    for klass, pattern in _RESTRICTIONS:
        if pattern.search(nc_text if klass == "non-commercial" else t):
            return klass, known
    found = [(m.start(), klass, name) for klass, name, pattern in _OPEN if (m := pattern.search(t))]
    if found:
        _, klass, name = min(found)
        version = {"GPL": r"gnu general public licen[cs]e,? version (\d)",
                   "Mozilla Public": r"mozilla public licen[cs]e,? (?:version )?(\d\.\d)"}.get(name)
        v = re.search(version, t) if version else None
        if v:
            name = f"{name} {v.group(1)}.0" if name == "GPL" else f"{name} {v.group(1)}"
        return klass, known or name
    return "unknown", known


def classify(licence_id: str | None, text: str | None) -> tuple[str, str | None]:
    """(class, canonical name) from a hub licence id and/or a licence text.

    A text that lets the licensor revoke at will wins over everything. Otherwise, where the id
    and the text both say something the stricter one is kept; else whichever says something.
    """
    by_id = _classify_id(licence_id)
    klass, name = _classify_text(text) if text and text.strip() else ("unknown", None)
    if klass == "revocable":
        return "revocable", name or (by_id[1] if by_id else None)
    if by_id and klass != "unknown":
        return max(by_id, (klass, name), key=lambda r: _STRICTNESS[r[0]])
    if by_id:
        return by_id
    if klass != "unknown":
        return klass, name
    plain = (licence_id or "").strip()
    return "unknown", name or (plain if plain.lower() not in ("", "other", "unknown") else None)


# --- reading a model folder ----------------------------------------------------------------

def _unquote(value: str) -> str:
    value = value.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        return value[1:end] if end > 0 else value[1:]
    return value.split(" #", 1)[0].strip()     # a trailing YAML comment


def parse_front_matter(text: str) -> dict[str, str | list[str]]:
    """Top-level `key: value` pairs (and simple lists) of a README's YAML front matter."""
    lines = text.lstrip("\ufeff").splitlines()      # splitlines() also handles CRLF
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines or lines[0].strip() != "---":
        return {}
    result: dict[str, str | list[str]] = {}
    key: str | None = None
    for line in lines[1:]:
        if line.strip() in ("---", "..."):
            break
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.match(r"^\s*-\s+(.*)$", line)
        if item and key is not None and isinstance(result.get(key), list):
            result[key].append(_unquote(item.group(1)))   # type: ignore[union-attr]
            continue
        m = re.match(r"^([A-Za-z_][\w.-]*)\s*:\s*(.*)$", line)   # top level only: no indent
        if not m:
            key = None if not line[:1].isspace() else key
            continue
        key, value = m.group(1), m.group(2).strip()
        if not value:
            result[key] = []                  # a list may follow
        elif value.startswith("[") and value.endswith("]"):
            result[key] = [_unquote(v) for v in value[1:-1].split(",") if v.strip()]
        else:
            result[key] = _unquote(value)
    return result


_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md",
                  "LICENSE.rst", "COPYING")
_MAX_TEXT = 512 * 1024


def _find_licence_file(model_dir: Path, hint: str | None) -> Path | None:
    try:
        entries = {p.name.lower(): p for p in model_dir.iterdir() if p.is_file()}
    except OSError:
        return None
    if hint and "://" not in hint:
        p = entries.get(Path(hint).name.lower())
        if p is not None:
            return p
    for name in _LICENCE_FILES:
        if name.lower() in entries:
            return entries[name.lower()]
    return None


def _read_text(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(_MAX_TEXT).decode("utf-8", "replace")
    except OSError:
        return None


def scratch_licence(preset: str) -> LicenceInfo:
    """A model trained from scratch has no upstream licence."""
    return _make("licence-free", None, None, f"preset {preset}".strip())


def read_licence(model_dir: Path | None, model_ref: str) -> LicenceInfo:
    """The licence of the model at `model_dir` (`model_ref` is what the user typed).

    With no folder yet (a hub id before download) the answer is "unknown" with a note; the
    loader asks again once the files are there.
    """
    if model_ref.startswith("scratch:"):
        return scratch_licence(model_ref.split(":", 1)[1])
    if model_dir is None or not Path(model_dir).is_dir():
        return _make("unknown", None, None, "not downloaded yet",
                     note="The licence will be read from the model's files after they are downloaded.")
    model_dir = Path(model_dir)
    readme = next((p for p in sorted(model_dir.iterdir())
                   if p.name.lower() == "readme.md" and p.is_file()), None)
    front = parse_front_matter(_read_text(readme) or "") if readme else {}
    raw = front.get("license") or []
    ids = [raw] if isinstance(raw, str) else [str(i) for i in raw]
    lic_name = front.get("license_name") if isinstance(front.get("license_name"), str) else None
    lic_link = front.get("license_link") if isinstance(front.get("license_link"), str) else None
    # `license: other` names its licence in `license_name`.
    ids = [lic_name if i.lower() == "other" and lic_name else i for i in ids]

    lic_file = _find_licence_file(model_dir, lic_link)
    text = _read_text(lic_file) if lic_file else None
    if not ids and text is None:
        return _make("unknown", None, None, "no licence in README.md and no LICENSE file")

    results = [(i, *classify(i, text)) for i in ids] or [(None, *classify(None, text))]
    licence_id, klass, name = max(results, key=lambda r: _STRICTNESS[r[1]])
    by_id = _classify_id(licence_id)
    sources = [f"{readme.name} front matter"] if ids and readme else []
    if lic_file is not None and (by_id is None or by_id[0] != klass):
        sources.append(f"{lic_file.name} file")      # the text decided, or changed the answer
    note = None
    if len(ids) > 1:
        note = f"The model card lists several licences ({', '.join(ids)}); the strictest is shown."
    elif klass == "unknown" and licence_id and licence_id.lower() not in ("other", "unknown"):
        note = f"Modron does not know the licence {licence_id!r}; read it on the model's page."
    return _make(klass, licence_id, name, " + ".join(sources), note=note)
