"""The licence guard: one case per class, from tiny README / LICENSE fixtures."""
from __future__ import annotations

import pytest

from training_core.licence import CLASSES, LicenceInfo, classify, parse_front_matter, read_licence, scratch_licence

APACHE = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
   ... each Contributor hereby grants to You a perpetual, worldwide, non-exclusive, no-charge,
   royalty-free, irrevocable copyright license ...
   Licensed under the Apache License, Version 2.0 (the "License");
"""

MIT = """MIT License

Copyright (c) 2024 Somebody

Permission is hereby granted, free of charge, to any person obtaining a copy of this software.
"""

# Written in the style of OPT-175B's licence: a revocable, non-commercial research grant.
OPT_STYLE = """<h2 align="center"> OPT-175B LICENSE AGREEMENT </h2>

1. **LICENSE GRANT**
   a. Meta grants you a non-exclusive, worldwide, non-transferable, revocable, royalty free and limited
   license to reproduce the Software solely for your non-commercial research purposes.
7. **TERMINATION; SURVIVAL**
   a. This License will automatically terminate upon any breach by you of the terms of this License.
   b. We may terminate this License, in whole or in part, at any time upon notice (including electronic) to you.
"""

AT_WILL_ONLY = """Example Model Licence
The licensor may terminate this licence at any time, for any reason, by posting a notice on its website.
"""

USER_MAY_TERMINATE = """Example Model Licence
Permission is hereby granted, free of charge, to any person obtaining a copy of this model.
You may terminate this License at any time by destroying all copies of the model.
The licensor may terminate this licence at any time if you breach any of its terms.
"""

REVOCABLE_GRANT = """Example Model Licence
The licensor grants you a worldwide, non-exclusive, revocable licence to use and modify the model.
"""

RESEARCH_ONLY = """Example Research Licence
You may use the model for research purposes only. Any commercial use is forbidden.
"""

RAIL_STYLE = """Open RAIL-style licence
You agree not to use the Model or Derivatives of the Model in any of the ways listed in Attachment A.
Attachment A: Use Restrictions
"""

GPL = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007
 Everyone is permitted to copy and distribute verbatim copies of this license document.
"""

CC_BY_SA_NOTE = """Licensor may stop distributing the Licensed Material at any time; however, doing so will
not terminate this Public License. Attribution-ShareAlike 4.0 International"""


def write(folder, name, text, newline="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text.replace("\n", newline).encode("utf-8"))
    return folder


def card(*lines):
    return "---\n" + "\n".join(lines) + "\n---\n\n# A model\n\nSome words.\n"


def test_every_class_has_a_summary_and_warnings_where_needed(tmp_path):
    seen = {}
    cases = {
        "permissive": card("license: apache-2.0"),
        "share-alike": card("license: gpl-3.0"),
        "non-commercial": card("license: cc-by-nc-4.0"),
        "use-restricted": card("license: openrail"),
        "unknown": card("tags:", "- text-generation"),
    }
    for klass, text in cases.items():
        info = read_licence(write(tmp_path / klass, "README.md", text), f"me/{klass}")
        seen[info.klass] = info
        assert info.klass == klass, (klass, info)
    seen["licence-free"] = scratch_licence("tiny")
    seen["revocable"] = read_licence(write(tmp_path / "rev", "LICENSE", OPT_STYLE), "me/rev")
    assert set(seen) == set(CLASSES)
    for klass, info in seen.items():
        assert isinstance(info, LicenceInfo) and info.klass == klass
        assert len(info.summary) > 40 and "\n" not in info.summary
        needs_warning = klass in ("non-commercial", "use-restricted", "revocable", "unknown")
        assert (info.warning is not None) == needs_warning, klass
        assert info.to_dict()["klass"] == klass


def test_scratch_is_licence_free():
    info = scratch_licence("tiny")
    assert info.klass == "licence-free" and info.source.startswith("preset")
    assert "choose any licence" in info.summary and info.warning is None
    assert read_licence(None, "scratch:tiny").klass == "licence-free"


def test_permissive_front_matter(tmp_path):
    info = read_licence(write(tmp_path, "README.md", card("license: apache-2.0", "language: en")), "org/m")
    assert (info.klass, info.licence_id, info.name) == ("permissive", "apache-2.0", "Apache 2.0")
    assert info.source == "README.md front matter"
    assert "commercially" in info.summary and info.warning is None


def test_llama3_front_matter_is_use_restricted(tmp_path):
    text = card("license: llama3", "extra_gated_prompt: >-", "  ### META LLAMA 3 COMMUNITY LICENSE AGREEMENT")
    info = read_licence(write(tmp_path, "README.md", text), "meta-llama/Meta-Llama-3-8B")
    assert info.klass == "use-restricted" and info.name == "Llama 3 Community License"
    assert "700 million" in info.summary
    assert "Llama 3 Community License" in info.warning


def test_non_commercial_cc_id_names_and_nd(tmp_path):
    info = read_licence(write(tmp_path, "README.md", card("license: cc-by-nc-nd-4.0")), "org/m")
    assert info.klass == "non-commercial" and info.name == "CC BY-NC-ND 4.0"
    assert "used commercially" in info.summary and "may not share" in info.summary
    assert "CC BY-NC-ND 4.0" in info.warning


def test_share_alike_and_revocable_from_licence_text(tmp_path):
    gpl = read_licence(write(tmp_path / "gpl", "LICENSE.txt", GPL), "org/gpl")
    assert (gpl.klass, gpl.name, gpl.source) == ("share-alike", "GPL 3.0", "LICENSE.txt file")
    opt = read_licence(write(tmp_path / "opt", "LICENSE.md", OPT_STYLE), "facebook/opt-125m")
    assert opt.klass == "revocable" and opt.name == "OPT-175B License"
    assert "at any time" in opt.summary and opt.warning


def test_revocable_wins_over_the_front_matter(tmp_path):
    folder = write(tmp_path, "README.md", card("license: other"))
    write(folder, "LICENSE.md", OPT_STYLE)
    info = read_licence(folder, "facebook/opt-350m")
    assert info.klass == "revocable"
    assert "LICENSE.md file" in info.source
    # Even a permissive id does not hide an at-will termination clause in the text.
    assert classify("mit", AT_WILL_ONLY)[0] == "revocable"


def test_termination_for_breach_or_by_the_user_is_not_revocable():
    klass, name = classify(None, USER_MAY_TERMINATE)
    assert (klass, name) == ("permissive", "MIT")
    assert classify(None, CC_BY_SA_NOTE)[0] == "share-alike"
    assert classify(None, APACHE) == ("permissive", "Apache 2.0")
    assert classify(None, "This licence is irrevocable. " + MIT)[0] == "permissive"
    assert classify(None, "This licence is not revocable. " + MIT)[0] == "permissive"


def test_a_revocable_grant_is_revocable():
    assert classify("apache-2.0", REVOCABLE_GRANT)[0] == "revocable"
    assert classify(None, REVOCABLE_GRANT) == ("revocable", None)


def test_other_with_licence_text_lets_the_text_decide(tmp_path):
    folder = write(tmp_path, "README.md", card("license: other", "license_name: acme-research",
                                               "license_link: LICENSE"))
    write(folder, "LICENSE", RESEARCH_ONLY)
    info = read_licence(folder, "acme/m")
    assert info.klass == "non-commercial"
    assert info.licence_id == "acme-research"
    assert "LICENSE file" in info.source and "README.md front matter" in info.source


def test_other_with_known_licence_name(tmp_path):
    info = read_licence(write(tmp_path, "README.md", card("license: other", "license_name: deepseek")), "ds/m")
    assert info.klass == "use-restricted" and info.name == "DeepSeek License"


def test_use_restricted_text_and_openrail_ids():
    assert classify(None, RAIL_STYLE)[0] == "use-restricted"
    for lid in ("openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
                "bigscience-bloom-rail-1.0", "llama2", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma"):
        assert classify(lid, None)[0] == "use-restricted", lid


@pytest.mark.parametrize("lid,klass", [
    ("apache-2.0", "permissive"), ("MIT", "permissive"), ("bsd-3-clause", "permissive"), ("isc", "permissive"),
    ("unlicense", "permissive"), ("cc0-1.0", "permissive"), ("cc-by-4.0", "permissive"), ("zlib", "permissive"),
    ("bsl-1.0", "permissive"), ("gpl-2.0", "share-alike"), ("agpl-3.0", "share-alike"), ("lgpl-3.0", "share-alike"),
    ("cc-by-sa-4.0", "share-alike"), ("mpl-2.0", "share-alike"), ("odbl", "share-alike"),
    ("cc-by-nc-4.0", "non-commercial"), ("cc-by-nc-sa-4.0", "non-commercial"), ("cc-by-nc-nd-3.0", "non-commercial"),
    ("other", "unknown"), ("unknown", "unknown"), (None, "unknown"),
])
def test_hub_ids(lid, klass):
    assert classify(lid, None)[0] == klass


def test_list_valued_licence_keeps_the_strictest(tmp_path):
    text = card("license:", "  - mit", "  - cc-by-nc-4.0", "language:", "- en")
    info = read_licence(write(tmp_path, "README.md", text), "org/m")
    assert info.klass == "non-commercial" and info.licence_id == "cc-by-nc-4.0"
    assert "several licences" in info.summary
    assert parse_front_matter(card("license: [mit, 'apache-2.0']"))["license"] == ["mit", "apache-2.0"]


def test_crlf_and_quotes_and_bom(tmp_path):
    text = "\ufeff" + card('license: "mit"  # the licence', "pipeline_tag: text-generation")
    info = read_licence(write(tmp_path, "README.md", text, newline="\r\n"), "org/m")
    assert (info.klass, info.licence_id) == ("permissive", "mit")


def test_front_matter_ignores_nested_keys_and_body():
    text = card("model-index:", "- name: x", "  license: gpl-3.0", "license: mit") + "license: agpl-3.0\n"
    assert parse_front_matter(text)["license"] == "mit"
    assert parse_front_matter("# no front matter\nlicense: mit\n") == {}


def test_no_files_at_all_is_unknown(tmp_path):
    info = read_licence(tmp_path, "org/empty")
    assert info.klass == "unknown" and info.licence_id is None
    assert "check the model's page" in info.summary.lower()
    assert info.warning


def test_unknown_id_is_named(tmp_path):
    info = read_licence(write(tmp_path, "README.md", card("license: made-up-1.0")), "org/m")
    assert info.klass == "unknown" and info.name == "made-up-1.0"
    assert "does not know" in info.summary


def test_hub_id_before_download():
    info = read_licence(None, "someone/some-model")
    assert info.klass == "unknown" and "after they are downloaded" in info.summary


def test_commercial_and_non_commercial_grant_is_not_a_restriction():
    text = "You may use the model for commercial and non-commercial purposes. " + MIT
    assert classify(None, text)[0] == "permissive"
