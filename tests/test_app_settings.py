"""The app's settings: one typed module (app/settings.py) lists every key, and nothing else names one."""
import re
from pathlib import Path

from app import settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_read_and_written_through_the_module():
    raw = re.compile(r"\.(get|set)_setting\(")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "app").rglob("*.py"))
                 if p.name not in ("settings.py", "store.py")
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if raw.search(line)]
    assert offenders == []


def test_settings_are_typed_with_defaults(store):
    assert len({s.key for s in settings.ALL.values()}) == len(settings.ALL) >= 14
    for s in settings.ALL.values():
        assert s.default is None or isinstance(s.default, s.types), s.key
        assert s.help, s.key
    assert settings.CHECKPOINT_MINUTES.get(store) == 10 and settings.UNSEEN_FAILURES.get(store) == []
    settings.UNSEEN_FAILURES.get(store).append(3)              # a copy: the default stays empty
    assert settings.UNSEEN_FAILURES.get(store) == []
    settings.CHECKPOINT_MINUTES.set(store, 5)
    assert settings.CHECKPOINT_MINUTES.get(store) == 5 and store.get_setting("checkpoint_minutes") == 5
    store.set_setting("checkpoint_minutes", "often")          # an odd value (a hand edit) reads as the default
    assert settings.CHECKPOINT_MINUTES.get(store) == 10
    settings.CHECKPOINT_MINUTES.set(store, None)              # None forgets it
    assert store.get_setting("checkpoint_minutes") is None
    data = settings.last_dir("data")
    assert data.key == "last_dir.data" and settings.ALL[data.key] is data and settings.last_dir("data") is data
