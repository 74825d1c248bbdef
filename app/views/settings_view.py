"""Settings: data folder, checkpoint interval, start with the desktop, the swarm's idle setting, and the
installation (what the installer chose; Repair install)."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget)

from app import autostart, install_info, settings
from app.views.form_ux import polish_form
from training_core.errors import UserError



def note(text: str) -> QLabel:
    """A wrapped, muted line of explanation under a setting."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet("color: palette(dark);")
    return label


class SettingsView(QWidget):
    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue

        title = QLabel("Settings")
        title.setStyleSheet("font-size: 16pt; font-weight: bold;")

        # Data folder: the store lives in it, so a change can only apply at the next start.
        self.data_dir_label = QLabel()
        self.data_dir_label.setWordWrap(True)
        self.next_dir_label = QLabel()
        self.next_dir_label.setWordWrap(True)
        self.change_dir_button = QPushButton("Change…")
        self.change_dir_button.clicked.connect(self._choose_data_dir)
        self.default_dir_button = QPushButton("Use the default folder")
        self.default_dir_button.clicked.connect(lambda: self.set_next_data_dir(None))
        self.change_dir_button.setToolTip("Pick another folder for the queue, history and runs "
                                          "(used from the next start)")
        self.default_dir_button.setToolTip("Go back to the default data folder from the next start")
        buttons = QHBoxLayout()
        buttons.addWidget(self.change_dir_button)
        buttons.addWidget(self.default_dir_button)
        buttons.addStretch(1)
        data_box = QGroupBox("Data folder")
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.data_dir_label)
        data_layout.addWidget(self.next_dir_label)
        data_layout.addLayout(buttons)
        data_layout.addWidget(note("The queue, history, settings and every run's checkpoints live here. "
                                    "A change takes effect the next time Modron starts; what is in the old "
                                    "folder stays there."))

        self.checkpoint_spin = QSpinBox()
        self.checkpoint_spin.setRange(1, 24 * 60)
        self.checkpoint_spin.setSuffix(" min")
        self.checkpoint_spin.setMaximumWidth(120)
        self.checkpoint_spin.setToolTip("For new jobs that don't set their own checkpoint interval in steps")
        self.checkpoint_spin.valueChanged.connect(lambda v: settings.CHECKPOINT_MINUTES.set(self.store, int(v)))
        train_box = QGroupBox("Training")
        train_form = QFormLayout(train_box)
        train_form.addRow("Save a checkpoint every", self.checkpoint_spin)
        train_form.addRow(note("Used by new jobs. A checkpoint is what a paused, stopped or crashed job "
                                "continues from; more often costs a little speed and disk writes."))
        self.prepare_box = QCheckBox("Load the training engine before the next job starts")
        self.prepare_box.setToolTip("While you fill in a new finetune, on a first run's Dashboard (for Try the demo), "
                                    "and in the last 30 seconds of a job "
                                    "with another queued behind it: the next job then trains within a second "
                                    "instead of after several seconds of loading. It holds about 0.4 GB of "
                                    "memory meanwhile, for at most 5 minutes")
        self.prepare_box.toggled.connect(lambda on: settings.PREPARE_WORKER.set(self.store, bool(on)))
        train_form.addRow(self.prepare_box)

        self.autostart_box = QCheckBox("Start Modron when I log in (in the tray)")
        self.autostart_box.setEnabled(autostart.supported())
        self.autostart_box.toggled.connect(self._autostart_toggled)
        self.autostart_box.setToolTip("Start Modron in the tray when you log in, so queued jobs go on")
        self.autostart_error = QLabel()
        self.autostart_error.setWordWrap(True)
        self.autostart_error.setStyleSheet("color: #b00020;")
        self.autostart_error.hide()
        desktop_box = QGroupBox("Desktop")
        desktop_layout = QVBoxLayout(desktop_box)
        desktop_layout.addWidget(self.autostart_box)
        desktop_layout.addWidget(self.autostart_error)

        self.contribute_box = QCheckBox("Contribute while idle")
        self.contribute_box.toggled.connect(lambda on: settings.CONTRIBUTE.set(self.store, bool(on)))
        self.contribute_box.setToolTip("Lend this computer to your swarm while you are away, "
                                       "within the contribution rules")
        swarm_box = QGroupBox("Swarm")
        swarm_layout = QVBoxLayout(swarm_box)
        swarm_layout.addWidget(self.contribute_box)
        swarm_layout.addWidget(note("Lend this computer to the swarm you joined (Swarm view) while you are "
                                     "away. When it may run (schedule, idle minutes, battery, games, GPU "
                                     "heat) is set under Contribution rules; the tray menu has the same "
                                     "switch."))

        # Installation: what the installer picked for this computer, and a rebuild of the environment.
        self.install_label = QLabel()
        self.install_label.setWordWrap(True)
        self.install_label.setTextFormat(Qt.TextFormat.PlainText)   # the record is data, never markup
        self.install_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.repair_button = QPushButton("Repair install")
        self.repair_button.clicked.connect(self.repair_install)
        self.repair_button.setToolTip("Run the installer again to rebuild Python's environment; "
                                      "your queue, runs and settings stay")
        self.repair_status = QLabel()
        self.repair_status.setWordWrap(True)
        repair_row = QHBoxLayout()
        repair_row.addWidget(self.repair_button)
        repair_row.addStretch(1)
        install_box = QGroupBox("Installation")
        install_layout = QVBoxLayout(install_box)
        install_layout.addWidget(self.install_label)
        install_layout.addLayout(repair_row)
        install_layout.addWidget(self.repair_status)
        install_layout.addWidget(note("Repair install runs the installer again: it rebuilds Python's environment "
                                       "with the PyTorch build for your GPU and keeps your queue, runs and "
                                       "settings. Quit Modron while it runs and start it again afterwards."))

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        for box in (data_box, train_box, desktop_box, swarm_box, install_box):
            layout.addWidget(box)
        layout.addStretch(1)
        polish_form(self)
        self.reload()

    def reload(self) -> None:
        """Show what is stored now (the tray may have changed a shared setting)."""
        from app.main import home_data_dir
        widgets = (self.checkpoint_spin, self.prepare_box, self.autostart_box, self.contribute_box)
        for w in widgets:
            w.blockSignals(True)
        self.checkpoint_spin.setValue(int(settings.CHECKPOINT_MINUTES.get(self.store)))
        self.prepare_box.setChecked(settings.PREPARE_WORKER.get(self.store))
        self.autostart_box.setChecked(autostart.supported() and autostart.is_enabled())
        self.contribute_box.setChecked(settings.CONTRIBUTE.get(self.store))
        for w in widgets:
            w.blockSignals(False)
        current = Path(self.store.path).parent
        self.data_dir_label.setText(f"Now: {current}")
        nxt = self._with_home_store(settings.DATA_DIR_NEXT.get)
        target = Path(nxt) if nxt else home_data_dir()
        changing = target.resolve() != current.resolve()
        self.next_dir_label.setText(f"From the next start: {target}" if changing else "")
        self.next_dir_label.setVisible(changing)
        self.default_dir_button.setVisible(bool(nxt))
        self._show_install()

    def showEvent(self, event) -> None:
        self.reload()
        super().showEvent(event)

    # --- data folder -------------------------------------------------------------------------

    def _with_home_store(self, fn):
        # The choice is kept in the *default* folder's store: that is where the next start looks.
        from app.main import home_data_dir
        from app.store import Store
        home = home_data_dir()
        if Path(self.store.path).parent.resolve() == home.resolve():
            return fn(self.store)
        store = Store(home / Path(self.store.path).name)
        try:
            return fn(store)
        finally:
            store.close()

    def set_next_data_dir(self, path: str | Path | None) -> None:
        """Use `path` as the data folder from the next start (None: back to the default)."""
        value = str(Path(path).expanduser().resolve()) if path else None
        self._with_home_store(lambda s: settings.DATA_DIR_NEXT.set(s, value))
        self.reload()

    def _choose_data_dir(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose Modron's data folder",
                                                  str(Path(self.store.path).parent))
        if folder:
            self.set_next_data_dir(folder)

    # --- autostart ---------------------------------------------------------------------------

    def _autostart_toggled(self, on: bool) -> None:
        try:
            autostart.set_enabled(on)
            self.autostart_error.hide()
        except UserError as exc:
            self.autostart_error.setText(str(exc))
            self.autostart_error.show()
            self.autostart_box.blockSignals(True)
            self.autostart_box.setChecked(not on)
            self.autostart_box.blockSignals(False)

    # --- installation ------------------------------------------------------------------------

    def _show_install(self) -> None:
        self.install_info = install_info.load()
        if self.install_info is None:
            self.install_label.setText(install_info.NOT_INSTALLED)
        else:
            self.install_label.setText("\n".join(f"{k}: {v}" for k, v in self.install_info.rows()))
        self.repair_button.setEnabled(bool(self.install_info and self.install_info.repair_command))

    def repair_install(self) -> None:
        """Start the installer's repair on its own; it outlives the app."""
        if not self.install_info:
            return
        try:
            install_info.start_repair(self.install_info)
        except UserError as exc:
            self.repair_status.setStyleSheet("color: #b00020;")
            self.repair_status.setText(str(exc))
            return
        self.repair_status.setStyleSheet("")
        self.repair_status.setText(f"The repair is running; its progress goes to {self.install_info.log_path}. "
                                   "Quit Modron now and start it again when the repair has finished.")
        self.repair_button.setEnabled(False)
