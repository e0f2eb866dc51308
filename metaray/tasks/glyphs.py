"""glyphs: a SYNTHETIC many-class few-shot image set in the Omniglot style, built offline from fonts.

This is a stand-in for Omniglot (Lake et al. 2015) that needs no download: it is NOT Omniglot and contains no
handwriting. A class is one Unicode character (letters, digits, symbols) covered by at least ``MIN_FONTS`` of the
TrueType fonts that ship inside matplotlib (DejaVu Sans/Serif/Mono and STIX General, all styles;
LastResortHE-Regular.ttf, which draws the same box for every code point, and the non-Unicode STIX size/variant and
Computer Modern fonts are excluded). Characters that look alike once normalized (Latin "A" vs Greek "Α", "o" vs
"O") are merged away, so no two classes are the same picture. Each sample draws the character in one of the fonts
that cover it, with a random stroke width (erosion/dilation) and a random affine map (rotation, shear, anisotropic
scale, translation), and is stored as a 28×28 grayscale image (white glyph on black, like Omniglot after the usual
inversion).

The build is a pure function of (classes, samples, seed): the same arguments give a byte-identical Parquet file
(FreeType rendering, PIL resampling and NumPy's PCG64 are deterministic). It is cached under
``data_dir()`` (``$METARAY_DATA`` or ``~/.cache/metaray``).
"""
from __future__ import annotations

import math
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

from .fewshot import DEFAULT_FRACTIONS, split_classes
from .storage import DatasetWriter, LabelledDataset, data_dir, open_dataset

SIZE = 28
CANVAS = 2 * SIZE        # draw at twice the size, then box-filter down (anti-aliasing)
RENDER_PX = 48           # FreeType pixel size of the master glyph
MIN_FONTS = 8            # a class needs this many fonts, so samples vary in style
CATEGORIES = ("Lu", "Ll", "Lo", "Lt", "Nd", "Nl", "No", "Sm", "So")
DEDUP_COSINE = 0.95      # normalized renders this similar are one class
VERSION = 2              # bump when the rendering changes: part of the cache file name


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=1)
def glyph_fonts() -> tuple[str, ...]:
    """The font files used: matplotlib's DejaVu and STIX General fonts (Unicode-mapped), sorted by name."""
    names = sorted(p.name for p in _font_dir().glob("*.ttf") if p.name.startswith(("DejaVu", "STIXGeneral")))
    return tuple(n for n in names if n != "LastResortHE-Regular.ttf")


@lru_cache(maxsize=None)
def _font(name: str):
    from matplotlib.ft2font import FT2Font

    return FT2Font(str(_font_dir() / name))


def _render(cp: int, font: str) -> np.ndarray:
    """The antialiased glyph bitmap (h, w) uint8 of one character in one font (may be empty)."""
    from matplotlib.ft2font import LoadFlags

    ft = _font(font)
    ft.set_size(RENDER_PX, 72)
    ft.set_text(chr(cp), 0.0, flags=LoadFlags.DEFAULT)
    ft.draw_glyphs_to_bitmap(antialiased=True)
    return np.array(ft.get_image(), dtype=np.uint8)


def _crop(a: np.ndarray) -> np.ndarray | None:
    rows, cols = np.flatnonzero(a.max(1) > 32), np.flatnonzero(a.max(0) > 32)
    if rows.size == 0 or cols.size == 0:
        return None
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _normalized(glyph: np.ndarray, side: int = 20, canvas: int = 24) -> np.ndarray:
    """The glyph scaled (aspect kept) into side×side, centered on a canvas: the picture classes are compared on."""
    from PIL import Image

    h, w = glyph.shape
    s = side / max(h, w)
    im = Image.fromarray(glyph).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    out = np.zeros((canvas, canvas), dtype=np.float32)
    y0, x0 = (canvas - im.height) // 2, (canvas - im.width) // 2
    out[y0 : y0 + im.height, x0 : x0 + im.width] = np.asarray(im, dtype=np.float32)
    return out


@lru_cache(maxsize=2)
def candidate_classes(min_fonts: int = MIN_FONTS) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """(code point, fonts that draw it) for every usable character, homoglyphs merged, sorted by code point."""
    cover: dict[int, list[str]] = {}
    for name in glyph_fonts():
        for cp in _font(name).get_charmap():
            cover.setdefault(cp, []).append(name)
    cands = []
    for cp in sorted(cover):
        if len(cover[cp]) < min_fonts or unicodedata.category(chr(cp)) not in CATEGORIES:
            continue
        fonts = tuple(f for f in cover[cp] if _crop(_render(cp, f)) is not None)  # some charmap entries are blank
        if len(fonts) >= min_fonts:
            cands.append((cp, fonts))
    ref = "DejaVuSans.ttf"
    vecs = []
    for cp, fonts in cands:
        v = _normalized(_crop(_render(cp, ref if ref in fonts else fonts[0]))).ravel()
        vecs.append(v / np.linalg.norm(v))
    sim = np.stack(vecs) @ np.stack(vecs).T
    keep: list[int] = []
    for i in range(len(cands)):
        if not keep or sim[i, keep].max() < DEDUP_COSINE:
            keep.append(i)
    return tuple(cands[i] for i in keep)


def class_name(cp: int) -> str:
    return f"U+{cp:04X} {unicodedata.name(chr(cp), '')}".strip()


def _stroke(img, level: int):
    from PIL import ImageFilter

    if level < 0:  # thinning; skipped where it would erase a thin font's strokes
        thin = img.filter(ImageFilter.MinFilter(3))
        keeps_shape = np.asarray(thin, dtype=np.float64).sum() >= 0.5 * np.asarray(img, dtype=np.float64).sum()
        return thin if keeps_shape else img
    if level > 0:
        return img.filter(ImageFilter.MaxFilter(2 * level + 1))
    return img


def render_sample(cp: int, font: str, rng: np.random.Generator) -> np.ndarray:
    """One 28×28 uint8 sample: the glyph with a random stroke width and affine map, box-filtered down."""
    from PIL import Image

    glyph = _crop(_render(cp, font))
    pad = 4
    img = Image.fromarray(np.pad(glyph, pad))
    img = _stroke(img, int(rng.choice([-1, 0, 0, 1, 1, 2])))
    h, w = glyph.shape
    # forward map, input pixel -> canvas pixel: translate glyph center to 0, scale, shear, rotate, move to center
    base = 0.70 * CANVAS / max(h, w)
    sx, sy = base * rng.uniform(0.8, 1.05), base * rng.uniform(0.8, 1.05)
    theta = math.radians(rng.uniform(-12.0, 12.0))
    shear = rng.uniform(-0.15, 0.15)
    tx, ty = rng.uniform(-3.0, 3.0, size=2) * 2
    c, s = math.cos(theta), math.sin(theta)
    A = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    center_in = np.array([pad + w / 2, pad + h / 2])
    center_out = np.array([CANVAS / 2 + tx, CANVAS / 2 + ty])
    Ainv = np.linalg.inv(A)
    offset = center_in - Ainv @ center_out  # PIL wants the inverse map: canvas pixel -> input pixel
    data = (Ainv[0, 0], Ainv[0, 1], offset[0], Ainv[1, 0], Ainv[1, 1], offset[1])
    out = img.transform((CANVAS, CANVAS), Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(out.reduce(2), dtype=np.uint8)


def glyphs_path(classes: int, samples: int, seed: int) -> Path:
    return data_dir() / f"glyphs-v{VERSION}-c{classes}-s{samples}-seed{seed}.parquet"


def build_glyphs(
    path: str | os.PathLike | None = None, *, classes: int = 1600, samples: int = 20, seed: int = 0
) -> Path:
    """Renders the glyph set and writes it as a metaray Parquet dataset (raw uint8, shape [1, 28, 28]), with a
    seeded 64/16/20 % train/val/test class split in its metadata. Returns the path."""
    cands = candidate_classes()
    if not isinstance(classes, int) or not 2 <= classes <= len(cands):
        raise ValueError(f"classes must be an int in [2, {len(cands)}] (the distinct characters the fonts cover), got {classes!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    path = Path(path) if path is not None else glyphs_path(classes, samples, seed)
    pick = np.sort(np.random.default_rng([seed, 0]).permutation(len(cands))[:classes])
    chosen = [cands[i] for i in pick]
    names = [class_name(cp) for cp, _ in chosen]
    with DatasetWriter(
        path,
        classes=names,
        shape=(1, SIZE, SIZE),
        encoding="raw",
        name="glyphs",
        source=(
            f"synthetic: {classes} Unicode characters rendered from matplotlib's DejaVu/STIX fonts with random affine "
            f"and stroke variation (metaray.tasks.glyphs v{VERSION}, seed {seed}); an Omniglot-style stand-in"
        ),
        class_splits=split_classes(names, DEFAULT_FRACTIONS, seed),
    ) as writer:
        for start in range(0, classes, 200):
            imgs, labels = [], []
            for label in range(start, min(start + 200, classes)):
                cp, fonts = chosen[label]
                rng = np.random.default_rng([seed, 1, cp])  # per class: a class's samples ignore the class count
                order = rng.permutation(len(fonts))
                for j in range(samples):
                    imgs.append(render_sample(cp, fonts[order[j % len(fonts)]], rng))
                    labels.append(label)
            writer.write(np.stack(imgs), labels)
    return path


def load_glyphs(classes: int = 1600, samples: int = 20, seed: int = 0) -> LabelledDataset:
    """The glyph set, built on first use and cached under ``data_dir()``, opened memory-mapped."""
    path = glyphs_path(classes, samples, seed)
    if not path.exists():
        build_glyphs(path, classes=classes, samples=samples, seed=seed)
    return open_dataset(path)
