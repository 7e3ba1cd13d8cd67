"""Image-side inputs: square padding, the official-style tap marker, and where a tap lands on the patch grid.

Screenshots are padded to a square (centred, LLaVA's ``expand2square``) before any image processor sees them:
CLIP-style processors centre-crop, which would cut off the edges of a tall phone or MiniWoB screenshot.
Action coordinates stay relative to the *original* screenshot; :func:`square_point` maps them into the
padded square and :func:`patch_index` onto the vision tower's patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from digiq.errors import DigiqError

if TYPE_CHECKING:
    from PIL import Image

    from digiq.schema import Action

Point = tuple[float, float]  # (y, x) in [0, 1], AitW order
Size = tuple[int, int]  # (width, height), PIL order

MARKER_COLOR = (255, 0, 0)


def pad_to_square(img: Image.Image, fill: int | Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Pad ``img`` (converted to RGB) to a centred square of side ``max(w, h)``; a square image is returned as is."""
    from PIL import Image

    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    color = (fill, fill, fill) if isinstance(fill, int) else tuple(int(c) for c in fill)
    out = Image.new("RGB", (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def square_point(point: Point, size: Size) -> Point:
    """Map ``(y, x)`` relative to an image of ``size`` = (w, h) into the square :func:`pad_to_square` makes."""
    y, x = point
    w, h = size
    side = max(w, h)
    return ((y * h + (side - h) // 2) / side, (x * w + (side - w) // 2) / side)


def patch_index(point: Point, grid: int) -> int:
    """Row-major index of the patch containing ``(y, x)`` on a ``grid``×``grid`` patch grid (edges clamp)."""
    y, x = point
    row = min(max(int(y * grid), 0), grid - 1)
    col = min(max(int(x * grid), 0), grid - 1)
    return row * grid + col


def patch_grid(n_image_tokens: int, strategy: str) -> tuple[int, int]:
    """``(grid, offset)`` of an image-token block: ``offset`` tokens (CLS, with strategy "full") precede a
    square grid of patches. Raises for blocks that are not a square grid (e.g. LLaVA-NeXT any-res)."""
    offset = 1 if strategy == "full" else 0
    grid = math.isqrt(n_image_tokens - offset)
    if grid * grid != n_image_tokens - offset:
        raise DigiqError(f"{n_image_tokens} image tokens (strategy {strategy!r}) are not a square patch grid; "
                         "the tap slot needs one", field="image_tokens")
    return grid, offset


def action_points(action: Action) -> list[Point]:
    """The screen points an action names, in slot order: a tap its touch point, a swipe touch then lift."""
    if action.kind == "tap":
        return [action.touch_point]
    if action.kind == "swipe":
        return [action.touch_point, action.lift_point]
    return []


def draw_tap_marker(img: Image.Image, action: Action, radius: float | None = None) -> Image.Image:
    """A copy of ``img`` with the official-style cursor marker at the action's touch point: a red ring with a
    crosshair (and, for a swipe, a red line to the lift point). Actions without a point return a copy.
    ``radius`` in pixels defaults to 4 % of the longer side."""
    from PIL import ImageDraw

    out = img.convert("RGB").copy()
    points = action_points(action)
    if not points:
        return out
    w, h = out.size
    # large enough to survive the resize to the working resolution (112 px for a 210 px screen: ×0.53)
    r = radius if radius is not None else max(4.0, 0.04 * max(w, h))
    width = max(2, round(r / 3))
    draw = ImageDraw.Draw(out)
    (y, x) = points[0]
    cx, cy = min(x * w, w - 1), min(y * h, h - 1)
    if len(points) == 2:
        (y1, x1) = points[1]
        draw.line([(cx, cy), (min(x1 * w, w - 1), min(y1 * h, h - 1))], fill=MARKER_COLOR, width=width)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=MARKER_COLOR, width=width)
    draw.line([(cx - 1.6 * r, cy), (cx + 1.6 * r, cy)], fill=MARKER_COLOR, width=width)
    draw.line([(cx, cy - 1.6 * r), (cx, cy + 1.6 * r)], fill=MARKER_COLOR, width=width)
    return out


def load_images(images: Sequence[Image.Image | str]) -> list[Image.Image]:
    """PIL images from PIL images or file paths (RGB)."""
    from PIL import Image

    out = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB") if item.mode != "RGB" else item)
        else:
            try:
                with Image.open(item) as img:
                    out.append(img.convert("RGB"))
            except OSError as exc:
                raise DigiqError(f"cannot read image: {exc}", file=str(item)) from None
    return out
