"""Every setting the app keeps in its Store, in one place: key, type, default and what it is for.

Code reads and writes a setting only through these: `CHECKPOINT_MINUTES.get(store)`,
`CONTRIBUTE.set(store, True)`. A stored value of the wrong type (an older Modron's, a hand edit) reads as
the default, so no caller has to guard against one. `None` as a value forgets the setting.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Setting(Generic[T]):
    key: str
    default: T
    types: tuple[type, ...]   # what a stored value may be; anything else reads as the default
    help: str

    def get(self, store) -> T:
        value = store.get_setting(self.key)
        if value is None or not isinstance(value, self.types):
            return copy.copy(self.default)   # lists and dicts: the caller may change its own copy
        return value

    def set(self, store, value: T | None) -> None:
        store.set_setting(self.key, value)


def _setting(key: str, default: Any, types: tuple[type, ...], help: str) -> Setting:
    s = Setting(key, default, types, help)
    ALL[key] = s
    return s


ALL: dict[str, Setting] = {}   # key -> setting, every one below (last_dir adds one per kind of dialog)
_NUMBER = (int, float)

# The queue and Settings
PAUSED_ALL = _setting("paused_all", False, (bool,), "everything paused from the tray")
CHECKPOINT_MINUTES = _setting("checkpoint_minutes", 10, _NUMBER,
                              "Settings' checkpoint interval, in minutes, for newly queued jobs")
DATA_DIR_NEXT = _setting("data_dir_next", None, (str,),
                         "the data folder from the next start (kept in the default folder's store)")
UNSEEN_FAILURES = _setting("unseen_failures", [], (list,), "ids of failed jobs the user has not seen yet (tray)")
PREPARE_WORKER = _setting("prepare_worker", True, (bool,),
                          "start a job's worker (its imports) while New finetune is open, and before a queued job's "
                          "turn (app/spare_worker.py)")
LAST_DIR = _setting("last_dir", None, (str,), "the folder of the last file dialog, of any kind")

# Swarm contribution
CONTRIBUTE = _setting("contribute_while_idle", False, (bool,), "lend the GPU to a swarm while idle (tray, Settings)")
SNOOZE_UNTIL = _setting("snooze_until", None, _NUMBER, "no contribution before this Unix time (tray)")
IDLE_RULES = _setting("idle_rules", {}, (dict,), "the contribution rules (IdleRules.to_dict, less the two above)")
SWARM_INVITE = _setting("swarm_invite", None, (str,), "the invite of the swarm joined")
SWARM_DOWNLOAD_CONSENT = _setting("swarm_download_consent", [], (list,),
                                  "hub ids of the joined invite the user agreed to download")
SWARM_GRACE_S = _setting("swarm_grace_s", 10.0, _NUMBER, "seconds a swarm worker has to pause or stop")
GPU_PRIORITY = _setting("gpu_priority", "local", (str,), "who has the GPU first: local or swarm")
SWARM_HANDBACK_S = _setting("swarm_handback_s", [], (list,), "the last hand-back latencies, in seconds")
SWARM_WORKER_PID = _setting("swarm_worker_pid", None, (int,),
                            "the swarm worker's pid, so one left by a crashed app is ended at the next start")


def last_dir(kind: str) -> Setting[str | None]:
    """The folder of the last file dialog of this kind ("data", "export", ...)."""
    key = f"{LAST_DIR.key}.{kind}"
    return ALL.get(key) or _setting(key, None, (str,), f"the folder of the last {kind} dialog")
