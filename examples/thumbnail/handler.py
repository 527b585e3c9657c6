"""Thumbnails for PNG images, in plain Python (zlib + struct): POST a PNG, get a smaller PNG.

    ember deploy examples/thumbnail
    ember invoke thumbnail --data @cat.png > thumb.png      # ?size=64 for the longest side

Handles 8-bit, non-interlaced greyscale, RGB and RGBA PNGs — enough to show binary bodies in
and out; a real function would import Pillow.
"""

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def chunks(data):
    pos = len(SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        yield kind, data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def unfilter(raw, width, height, bpp):
    stride = width * bpp
    rows, prev, pos = [], bytearray(stride), 0
    for _ in range(height):
        kind, line = raw[pos], bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                line[i] = (line[i] + paeth(left, up, corner)) & 0xFF
        rows.append(line)
        prev = line
    return rows


def decode(data):
    if not data.startswith(SIGNATURE):
        raise ValueError("the body is not a PNG image")
    header, idat = None, b""
    for kind, body in chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in CHANNELS or interlace:
        raise ValueError("only 8-bit, non-interlaced greyscale/RGB/RGBA PNGs are supported")
    bpp = CHANNELS[colour]
    return width, height, colour, bpp, unfilter(zlib.decompress(idat), width, height, bpp)


def encode(width, height, colour, rows):
    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(
        b"IEND", b"")


def handle(req, ctx):
    size = int(req.query.get("size", "128"))
    try:
        width, height, colour, bpp, rows = decode(req.body)
    except (ValueError, TypeError, struct.error, zlib.error) as exc:
        return {"error": str(exc)}, 400
    scale = max(width, height) / size if max(width, height) > size else 1
    new_w, new_h = max(1, int(width / scale)), max(1, int(height / scale))
    out = []
    for y in range(new_h):
        src = rows[int(y * scale)]
        line = bytearray()
        for x in range(new_w):
            at = int(x * scale) * bpp
            line += src[at : at + bpp]
        out.append(line)
    ctx.log.info("thumbnail %dx%d -> %dx%d", width, height, new_w, new_h)
    return encode(new_w, new_h, colour, out), 200, {"Content-Type": "image/png"}
