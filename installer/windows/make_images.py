"""Remakes the Windows installer's images from Modron's icon (resources/icons/modron.svg), with Qt:

    QT_QPA_PLATFORM=offscreen .venv/bin/python installer/windows/make_images.py [--out DIR]

- wizard.bmp  164x314, 24-bit: the Welcome and Finish pages' bitmap (installer and uninstaller), the icon with
  the name "Modron" under it on a pale lavender
- header.bmp  150x57, 24-bit: the header image of the other pages, the icon and the name on white
- modron.ico  the icon at 48 px (installer, uninstaller, Start menu, Apps & features)

They are written beside this script (--out DIR: elsewhere, as the tests do). They are committed, so building the
installer needs no Qt; rerun this after changing the SVG.
The SVG is drawn with QSvgRenderer into a QImage, as for modron.ico; the text uses DejaVu Sans Bold where
installed (Qt falls back to another sans-serif font otherwise, so the pixels may differ between machines).
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QRectF, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QImageWriter, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

HERE = Path(__file__).resolve().parent
SVG = HERE.parents[1] / "resources" / "icons" / "modron.svg"
WIZARD_BACKGROUND = QColor("#efecff")   # a pale tint of the icon's colour, set off from the page's white text area
HEADER_BACKGROUND = QColor("#ffffff")   # the header's own white
TEXT = QColor("#4338ca")   # the icon's darker gradient stop


def _icon(renderer: QSvgRenderer, size: int) -> QImage:
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    with_painter(image, lambda p: renderer.render(p))
    return image


def with_painter(image: QImage, draw) -> None:
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.TextAntialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    try:
        draw(painter)
    finally:
        painter.end()


def _font(pixels: int) -> QFont:
    font = QFont("DejaVu Sans")
    font.setStyleHint(QFont.StyleHint.SansSerif)
    font.setPixelSize(pixels)
    font.setBold(True)
    return font


def _canvas(width: int, height: int, background: QColor) -> QImage:
    image = QImage(width, height, QImage.Format.Format_RGB32)   # no alpha: Qt's BMP writer writes 24 bits
    image.fill(background)
    return image


def wizard(renderer: QSvgRenderer) -> QImage:
    """164x314: the icon (96 px) in the upper part, "Modron" under it, both centred."""
    image = _canvas(164, 314, WIZARD_BACKGROUND)

    def draw(p: QPainter) -> None:
        renderer.render(p, QRectF(34, 70, 96, 96))
        p.setFont(_font(26))
        p.setPen(TEXT)
        p.drawText(QRectF(0, 172, 164, 40), Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter, "Modron")
    with_painter(image, draw)
    return image


def header(renderer: QSvgRenderer) -> QImage:
    """150x57: the icon (44 px) at the left, "Modron" beside it."""
    image = _canvas(150, 57, HEADER_BACKGROUND)

    def draw(p: QPainter) -> None:
        renderer.render(p, QRectF(6, 6.5, 44, 44))
        p.setFont(_font(22))
        p.setPen(TEXT)
        p.drawText(QRectF(54, 0, 96, 57), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, "Modron")
    with_painter(image, draw)
    return image


def _save(image: QImage, path: Path, fmt: bytes) -> None:
    writer = QImageWriter(str(path), fmt)
    if not writer.write(image):
        sys.exit(f"make_images.py: could not write {path}: {writer.errorString()}")
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="the folder to write to (default: this script's)")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])   # fonts need a GUI application
    renderer = QSvgRenderer(str(SVG))
    if not renderer.isValid():
        sys.exit(f"make_images.py: cannot read {SVG}")
    _save(wizard(renderer), out / "wizard.bmp", b"bmp")
    _save(header(renderer), out / "header.bmp", b"bmp")
    _save(_icon(renderer, 48), out / "modron.ico", b"ico")
    del app


if __name__ == "__main__":
    main()
