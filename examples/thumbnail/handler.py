"""Thumbnails with Pillow: POST an image, get a PNG no larger than `size` on its longest side.

    ember deploy examples/thumbnail          # installs Pillow (requirements.txt) once
    ember invoke thumbnail --data @cat.png > thumb.png      # ?size=64 for the longest side

Pillow comes from requirements.txt: Ember resolves it at deploy into a shared, read-only layer
(docs/dependencies.md), and the zygote imports it once; every instance forks with it loaded.
"""

import io

from PIL import Image, UnidentifiedImageError


def handle(req, ctx):
    size = int(req.query.get("size", "128"))
    try:
        image = Image.open(io.BytesIO(req.body))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        return {"error": f"the body is not an image Pillow can read: {exc}"}, 400
    original = image.size
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG")
    ctx.log.info("thumbnail %dx%d -> %dx%d", *original, *image.size)
    return out.getvalue(), 200, {"Content-Type": "image/png"}
