"""Swarm: join a community training run with an invite, watch it, see your share and why you are
(or are not) contributing right now. An invite that names a hub model or tokenizer is joined only
after the user agrees to download it (ConsentDialog: what, from where, its licence class)."""
from __future__ import annotations

import html
import math
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QPushButton, QVBoxLayout, QWidget)

from app.charts import TimeSeriesChart
from app.contribution import (forget_invite, handback_latencies, join_invite, joined_manifest, load_rules,
                              save_rules)
from app.views.job_table import view_title
from training_core.errors import ConfigError
from training_core.swarm.manifest import SwarmManifest, read_invite
from training_core.swarm.sources import HubDownload, describe_downloads

STATE_TEXT = {"starting": "Starting the swarm worker…", "contributing": "Contributing now.",
              "resuming": "Rejoining the swarm…", "pausing": "Handing the GPU back…",
              "stopping": "Leaving the swarm…"}


def human_bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _dash(value, fmt="{}") -> str:
    return "–" if value is None else fmt.format(value)


# `swarm` event fields (docs/protocol.md). Workers before DiLoCo send none of the round fields and
# only ever average every step: their events read as "sync" with no round figures.
ALGORITHM_TEXT = {"sync": "Per-step averaging", "diloco": "DiLoCo rounds"}
PHASE_TEXT = {"waiting": "Waiting for the swarm", "syncing": "Catching up with the swarm", "paused": "Paused"}


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def algorithm_text(s: dict) -> str:
    """The swarm's algorithm in words; "–" before any status of the swarm is known."""
    algo = s.get("algorithm")
    if algo is None:
        return "–" if s.get("peers") is None else ALGORITHM_TEXT["sync"]
    return ALGORITHM_TEXT.get(algo, str(algo))


def about(seconds) -> str:
    """A rough time from now: "in a few seconds", "in about 45 s", "in about 2 min", "in about 1.5 h"."""
    s = max(0.0, float(seconds))
    if s < 10:
        return "in a few seconds"
    if s < 55:
        return f"in about {5 * round(s / 5):.0f} s"
    if s < 90 * 60:
        return f"in about {max(1, round(s / 60)):.0f} min"
    return f"in about {f'{s / 3600:.1f}'.removesuffix('.0')} h"


def activity_text(ev: dict) -> str:
    """What the peer (or host) is doing now, from its last `swarm` event; "" when it doesn't say."""
    phase = ev.get("phase")
    unit = "round" if ev.get("algorithm") == "diloco" else "epoch"
    rnd = _num(ev.get("round"))
    where = f" ({unit} {int(rnd)})" if rnd is not None else ""
    if phase == "inner":
        text = f"Training locally{where}"
    elif phase == "exchanging":
        peers = _num(ev.get("peers"))      # alive in the swarm, this peer included
        with_whom = _plural(int(peers) - 1, "peer") if peers is not None and peers > 1 else "the swarm"
        text = f"Exchanging with {with_whom}{where}"
    elif phase == "watching":
        text = f"Watching the swarm{where}"
    elif phase in PHASE_TEXT:
        text = PHASE_TEXT[phase]
    else:
        return ""
    nxt = _num(ev.get("next_exchange_s"))
    if phase in ("inner", "watching") and nxt is not None and math.isfinite(nxt):
        text += f", next exchange {about(nxt)}"
    return text


def last_round_text(s: dict) -> str:
    """Peers and bytes of this peer's last completed round: "3 peers, 1.2 MB up / 3.4 MB down"."""
    n, up, down = (_num(s.get(k)) for k in ("round_peers", "round_bytes_up", "round_bytes_down"))
    if n is None and up is None and down is None:
        return "–"
    if not n and not up and not down:
        return "none yet"
    return f"{_plural(int(n or 0), 'peer')}, {human_bytes(up)} up / {human_bytes(down)} down"


def consent_html(manifest: SwarmManifest, downloads: list[HubDownload]) -> str:
    """What the user agrees to: each hub download, where it comes from, its licence class as far as it is
    known before downloading, and that the invite is a stranger's choice."""
    esc = html.escape
    items = []
    for d in downloads:
        if d.cached:
            where = "already in your download cache from an earlier download: nothing new is fetched"
        else:
            where = (f"downloaded from the Hugging Face hub ({esc(d.url)}); its size is known only once the "
                     "download starts (base models are often several GB)")
        items.append(f"<li>the {esc(d.what)} <b>{esc(d.repo)}</b>, {where}.<br>"
                     f"Licence: {esc(d.licence_text)}.</li>")
    return (f"<p>To join the swarm <b>{esc(manifest.run_id)}</b>, Modron needs:</p><ul>{''.join(items)}</ul>"
            "<p>The invite chose this, not Modron: agree only if you trust it and its licence suits you. "
            "Nothing is downloaded unless you choose <i>Download and join</i>.</p>")


class ConsentDialog(QDialog):
    """Asks before an invite's hub model or tokenizer is downloaded. Opened window-modal with open(),
    so the caller (and a test) goes on; accepted / rejected say the answer."""

    def __init__(self, manifest: SwarmManifest, downloads: list[HubDownload], parent=None):
        super().__init__(parent)
        self.downloads = downloads
        self.setWindowTitle("Download from the Hugging Face hub?")
        self.text_label = QLabel(consent_html(manifest, downloads))
        self.text_label.setWordWrap(True)
        self.text_label.setTextFormat(Qt.RichText)
        self.text_label.setTextInteractionFlags(Qt.TextSelectableByMouse)   # no links opened by accident
        buttons = QDialogButtonBox()
        self.accept_button = buttons.addButton("Download and join", QDialogButtonBox.AcceptRole)
        self.cancel_button = buttons.addButton("Cancel", QDialogButtonBox.RejectRole)
        self.accept_button.setAutoDefault(False)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text_label)
        layout.addWidget(buttons)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.cancel_button.setDefault(True)       # Enter does not agree to a download
        self.cancel_button.setFocus()


class SwarmView(QWidget):
    def __init__(self, store, queue, parent=None, contributor=None):
        super().__init__(parent)
        self.store, self.queue, self.contributor = store, queue, contributor
        self.setAcceptDrops(True)
        self._t0: float | None = None     # time of the chart's first point
        self._run_id: str | None = None
        self._live: dict = {}             # the last `swarm` event of the running worker (phase...)
        self.consent_dialog: ConsentDialog | None = None

        title = view_title("Swarm")

        # Joining: paste or drop.
        self.invite_edit = QLineEdit()
        self.invite_edit.setPlaceholderText("Paste an invite (modron-invite:1:…) or drop an invite file here")
        self.invite_edit.returnPressed.connect(lambda: self.join(self.invite_edit.text()))
        self.join_button = QPushButton("Join")
        self.join_button.clicked.connect(lambda: self.join(self.invite_edit.text()))
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #b00020;")
        self.error_label.hide()
        row = QHBoxLayout()
        row.addWidget(self.invite_edit, 1)
        row.addWidget(self.join_button)
        self.join_box = QGroupBox("Join a swarm")
        join_layout = QVBoxLayout(self.join_box)
        join_layout.addLayout(row)
        join_layout.addWidget(self.error_label)

        self.swarm_label = QLabel()
        self.swarm_label.setWordWrap(True)
        self.leave_button = QPushButton("Leave swarm")
        self.leave_button.clicked.connect(self.leave)
        joined_row = QHBoxLayout()
        joined_row.addWidget(self.swarm_label, 1)
        joined_row.addWidget(self.leave_button)
        self.joined_box = QGroupBox("Your swarm")
        QVBoxLayout(self.joined_box).addLayout(joined_row)

        # Now: contributing or why not, and the choice when idle can't be read.
        self.state_label = QLabel()
        self.state_label.setWordWrap(True)
        self.state_label.setStyleSheet("font-size: 11pt;")
        self.latency_label = QLabel()
        self.unknown_label = QLabel()
        self.unknown_label.setWordWrap(True)
        self.assume_idle_button = QPushButton("Contribute when Modron can't tell")
        self.assume_idle_button.clicked.connect(lambda: self.choose_unknown_idle("assume_idle"))
        self.never_button = QPushButton("Don't contribute then")
        self.never_button.clicked.connect(lambda: self.choose_unknown_idle("never"))
        self.unknown_box = QWidget()
        unknown_layout = QVBoxLayout(self.unknown_box)
        unknown_layout.setContentsMargins(0, 0, 0, 0)
        unknown_layout.addWidget(self.unknown_label)
        choice = QHBoxLayout()
        choice.addWidget(self.assume_idle_button)
        choice.addWidget(self.never_button)
        choice.addStretch(1)
        unknown_layout.addLayout(choice)
        self.unknown_box.hide()
        now_box = QGroupBox("Now")
        now_layout = QVBoxLayout(now_box)
        now_layout.addWidget(self.state_label)
        self.activity_label = QLabel()     # what the worker is doing now, from its `swarm` events
        self.activity_label.setWordWrap(True)
        self.activity_label.hide()
        now_layout.addWidget(self.activity_label)
        now_layout.addWidget(self.unknown_box)
        now_layout.addWidget(self.latency_label)

        # Figures.
        self.peers_label, self.epoch_label = QLabel("–"), QLabel("–")
        self.speed_label = QLabel("–")
        self.samples_label, self.hours_label = QLabel("–"), QLabel("–")
        self.bandwidth_label = QLabel("–")
        self.algorithm_label, self.round_label = QLabel("–"), QLabel("–")
        self.last_round_label = QLabel("–")
        figures = QGroupBox("The swarm and your share")
        self.form = form = QFormLayout(figures)
        form.addRow("Algorithm", self.algorithm_label)
        form.addRow("Peers", self.peers_label)
        form.addRow("Epoch", self.epoch_label)
        form.addRow("Round", self.round_label)          # DiLoCo only: a sync swarm's round is its epoch
        form.addRow("Last round", self.last_round_label)
        form.addRow("Swarm speed", self.speed_label)
        form.addRow("Your samples", self.samples_label)
        form.addRow("Your time", self.hours_label)
        form.addRow("Bandwidth (up / down)", self.bandwidth_label)

        self.chart = TimeSeriesChart("Swarm loss", "loss", x_mode="time")
        self.chart.add_series("loss", "swarm loss")

        top = QHBoxLayout()
        left = QVBoxLayout()
        left.addWidget(now_box)
        left.addWidget(figures)
        left.addStretch(1)
        top.addLayout(left, 2)
        top.addWidget(self.chart, 3)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(self.join_box)
        layout.addWidget(self.joined_box)
        layout.addLayout(top, 1)

        if contributor is not None:
            contributor.swarm_event.connect(self.on_event)
            contributor.changed.connect(self.refresh_state)
        self.reload()

    # --- joining -------------------------------------------------------------------------------
    def join(self, text_or_path) -> bool:
        """Join with an invite. One that names a hub download first asks (ConsentDialog) and returns
        False: the join happens when the user agrees."""
        try:
            manifest = read_invite(text_or_path)
        except ConfigError as exc:
            return self._show_error(exc)
        downloads = describe_downloads(manifest)
        if downloads:
            self._ask_consent(text_or_path, manifest, downloads)
            return False
        return self._join(text_or_path, [])

    def _ask_consent(self, text_or_path, manifest: SwarmManifest, downloads: list[HubDownload]) -> None:
        if self.consent_dialog is not None:
            self.consent_dialog.close()
        dialog = self.consent_dialog = ConsentDialog(manifest, downloads, self)
        repos = [d.repo for d in downloads]

        def answered(result: int) -> None:
            if self.consent_dialog is dialog:
                self.consent_dialog = None
            dialog.deleteLater()
            if result == QDialog.Accepted:
                self._join(text_or_path, repos)
            else:
                self.error_label.setText(f"Not joined: you did not agree to download {', '.join(repos)}.")
                self.error_label.show()
        dialog.finished.connect(answered)
        dialog.open()

    def _join(self, text_or_path, accept_downloads: list[str]) -> bool:
        try:
            if self.contributor is not None:
                self.contributor.join(text_or_path, accept_downloads)
            else:
                join_invite(self.store, text_or_path, accept_downloads)
        except ConfigError as exc:
            return self._show_error(exc)
        self.error_label.hide()
        self.invite_edit.clear()
        self.reload()
        return True

    def _show_error(self, exc: ConfigError) -> bool:
        self.error_label.setText(str(exc).splitlines()[0])
        self.error_label.show()
        return False

    def leave(self) -> None:
        if self.contributor is not None:
            self.contributor.leave()
        else:
            forget_invite(self.store)
        self.reload()

    def dragEnterEvent(self, event) -> None:
        mime = event.mimeData()
        if mime.hasUrls() or mime.hasText():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        mime = event.mimeData()
        files = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()] if mime.hasUrls() else []
        self.join(Path(files[0]) if files else mime.text())
        event.acceptProposedAction()

    def choose_unknown_idle(self, choice: str) -> None:
        rules, _ = load_rules(self.store)
        rules.unknown_idle = choice
        save_rules(self.store, rules)
        if self.contributor is not None:
            self.contributor.poke()
        self.refresh_state()

    # --- showing ---------------------------------------------------------------------------------
    def reload(self) -> None:
        """Everything from the store: the joined swarm, its chart and your totals."""
        manifest = joined_manifest(self.store)
        joined = manifest is not None
        self.join_box.setVisible(not joined)
        self.joined_box.setVisible(joined)
        run_id = manifest.run_id if joined else None
        if run_id != self._run_id:
            self._live = {}
        self._run_id = run_id
        self._t0 = None
        self.chart.set_series("loss", [], [])
        if joined:
            source = "" if manifest.is_scratch else " (from the Hugging Face hub)"
            self.swarm_label.setText(f"<b>{html.escape(manifest.run_id)}</b>: {html.escape(manifest.model)}"
                                     f"{source}, {len(manifest.initial_peers)} initial peer(s)")
            m = self.store.swarm_metrics(manifest.run_id)
            pts = [(t, loss) for t, loss in zip(m["time"], m["loss"]) if loss is not None]
            if pts:
                self._t0 = pts[0][0]
                xs = [t - self._t0 for t, _ in pts]
                self.chart.set_series("loss", xs, [loss for _, loss in pts], xs)
            stats = self.store.swarm_stats(manifest.run_id)
            self._show_figures({**stats.get("last_status", {}), **stats})
        else:
            self._show_figures({})
        self.refresh_state()

    def _show_figures(self, s: dict) -> None:
        self.algorithm_label.setText(algorithm_text(s))
        diloco = s.get("algorithm") == "diloco"
        self.round_label.setText(_dash(_num(s.get("round")), "{:.0f}"))
        self.form.setRowVisible(self.round_label, diloco)
        self.last_round_label.setText(last_round_text(s))
        self.peers_label.setText(_dash(s.get("peers")))
        self.epoch_label.setText(_dash(s.get("epoch")))
        self.speed_label.setText(_dash(s.get("global_samples_per_s"), "{:.1f} samples/s"))
        self.samples_label.setText(f"{int(s.get('samples') or 0):,}")
        self.hours_label.setText(f"{float(s.get('contributed_s') or 0) / 3600:.2f} h")
        self.bandwidth_label.setText(f"{human_bytes(s.get('bytes_up'))} / {human_bytes(s.get('bytes_down'))}")

    def on_event(self, ev: dict) -> None:
        if ev.get("type") != "swarm" or (self._run_id and ev.get("run_id") not in (None, self._run_id)):
            return
        c = self.contributor
        totals = c.last_swarm if c is not None and c.last_swarm else ev
        self._show_figures({**ev, **{k: totals.get(k) for k in ("samples", "contributed_s", "bytes_up", "bytes_down")
                                     if totals.get(k) is not None}})
        self._live = dict(ev)
        self._show_activity()
        loss, t = ev.get("loss"), ev.get("time")
        if isinstance(loss, (int, float)) and isinstance(t, (int, float)):
            if self._t0 is None:
                self._t0 = t
            self.chart.append("loss", t - self._t0, loss, t - self._t0)

    def refresh_state(self) -> None:
        c = self.contributor
        rules, problem = load_rules(self.store)
        if c is None:
            text = "Contribution is not running in this window."
        elif c.state in STATE_TEXT:
            text = STATE_TEXT[c.state]
        else:
            text = f"Not contributing: {c.reason}" if c.reason else "Not contributing."
        if problem:
            text += "\n" + problem
        self.state_label.setText(text)
        if c is not None and c.state != "contributing":
            self._live = {}     # paused, stopped or restarting: the last phase is stale
        self._show_activity()
        ask = (c is not None and c.decision is not None and c.decision.rule == "idle_unknown"
               and rules.unknown_idle == "ask")
        if ask:
            note = (c.notes or {}).get("idle_note") or "Modron can't tell whether you are using this computer."
            self.unknown_label.setText(f"{note[0].upper() + note[1:]}. What should Modron do?")
        self.unknown_box.setVisible(ask)
        lat = c.latencies if c is not None else handback_latencies(self.store)
        self.latency_label.setText(f"Last hand-back of the GPU: {lat[-1]:.2f} s" if lat else "")
        self.latency_label.setVisible(bool(lat))

    def _show_activity(self) -> None:
        text = activity_text(self._live)
        self.activity_label.setText(text)
        self.activity_label.setVisible(bool(text))

    def showEvent(self, event) -> None:
        self.reload()
        super().showEvent(event)
