"""`modron-train models search TEXT`: text-generation models on the Hugging Face hub whose id contains TEXT,
most downloaded first (the hub's model listing through huggingface_hub's session; the app runs this in an
engine process).

The answer is the hub's, so it is checked: ids must be plain hub ids, numbers are bounded, licence ids
plain words, and at most MAX_RESULTS come back.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from .errors import UserError

MAX_RESULTS = 50
MAX_COUNT = 10 ** 12
LICENCE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")


def _count(value: Any) -> int:
    return min(max(value, 0), MAX_COUNT) if isinstance(value, int) and not isinstance(value, bool) else 0


def search(text: str, limit: int = 20) -> list[dict[str, Any]]:
    from huggingface_hub import ModelInfo
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from .catalog import is_hub_id
    from .download import HTTP_TIMEOUT_S, _endpoint, _hub_error
    from .licence import classify
    text = text.strip()
    if not 0 < len(text) <= 96 or not text.isprintable():
        raise UserError("search", "type 1 to 96 characters of a model's id, e.g. SmolLM2")
    limit = max(1, min(limit, MAX_RESULTS))
    try:
        # The listing list_models asks for, one page and one try (its paging retries an unreachable hub
        # for half a minute): a hostile or huge answer is never walked to its end.
        r = get_session().get(f"{_endpoint()}/api/models", headers=build_hf_headers(), timeout=HTTP_TIMEOUT_S,
                              params={"search": text, "pipeline_tag": "text-generation", "sort": "downloads",
                                      "limit": limit})
        hf_raise_for_status(r)
        items = r.json()
        found = [ModelInfo(**item) for item in (items if isinstance(items, list) else [])[:limit]
                 if isinstance(item, dict) and isinstance(item.get("id"), str)]
    except Exception as exc:   # network, HTTP and parse errors come in many types; all one line
        raise _hub_error(f"search {text!r}", exc) from None
    models = []
    for info in found:
        model_id = getattr(info, "id", None)
        if not isinstance(model_id, str) or not is_hub_id(model_id):
            continue
        tags = [t for t in (getattr(info, "tags", None) or []) if isinstance(t, str)]
        licence_id = next((t.split(":", 1)[1] for t in tags if t.startswith("license:")), None)
        if licence_id is not None and not LICENCE_ID.match(licence_id):
            licence_id = None
        gated = getattr(info, "gated", None)
        models.append({"id": model_id, "downloads": _count(getattr(info, "downloads", None)),
                       "likes": _count(getattr(info, "likes", None)), "licence_id": licence_id,
                       "licence_class": classify(licence_id, None)[0] if licence_id else "unknown",
                       "gated": gated not in (None, False)})
    return models


def cmd_models_search(args) -> int:
    from .protocol import encode_answer
    models = search(args.text, args.limit)
    if args.json:
        print(encode_answer({"query": args.text, "models": models}))
    elif not models:
        print(f"no text-generation model on the hub has {args.text!r} in its id")
    else:
        for m in models:
            gated = ", gated" if m["gated"] else ""
            print(f"{m['id']}  ({m['downloads']:,} downloads, licence {m['licence_id'] or 'unknown'}: "
                  f"{m['licence_class']}{gated})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="find models on the Hugging Face hub")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    s = msub.add_parser("search", help="text-generation models whose id contains TEXT, most downloaded first")
    s.add_argument("text", metavar="TEXT")
    s.add_argument("--limit", type=int, default=20, help=f"at most this many (1-{MAX_RESULTS}; default: 20)")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.set_defaults(func=cmd_models_search)
