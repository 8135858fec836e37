"""A small line chart written as a PNG with the standard library only (zlib + struct): panels of
series over a shared x axis, with tick labels in a 5x7 bitmap font. Enough for the soak's figure;
no matplotlib to install."""

import struct
import zlib

# 5x7 glyphs, one string of 5 bits per row. Lower case is drawn as upper case.
FONT = {
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "3": ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "6": ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "8": ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "B": ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
    "C": ["01110", "10001", "10000", "10000", "10000", "10001", "01110"],
    "D": ["11100", "10010", "10001", "10001", "10001", "10010", "11100"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "F": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
    "G": ["01110", "10001", "10000", "10111", "10001", "10001", "01111"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
    "I": ["01110", "00100", "00100", "00100", "00100", "00100", "01110"],
    "J": ["00111", "00010", "00010", "00010", "00010", "10010", "01100"],
    "K": ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "N": ["10001", "10001", "11001", "10101", "10011", "10001", "10001"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "Q": ["01110", "10001", "10001", "10001", "10101", "10010", "01101"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "U": ["10001", "10001", "10001", "10001", "10001", "10001", "01110"],
    "V": ["10001", "10001", "10001", "10001", "10001", "01010", "00100"],
    "W": ["10001", "10001", "10001", "10101", "10101", "10101", "01010"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "Y": ["10001", "10001", "10001", "01010", "00100", "00100", "00100"],
    "Z": ["11111", "00001", "00010", "00100", "01000", "10000", "11111"],
    " ": ["00000"] * 7,
    ".": ["00000", "00000", "00000", "00000", "00000", "01100", "01100"],
    ",": ["00000", "00000", "00000", "00000", "01100", "00100", "01000"],
    ":": ["00000", "01100", "01100", "00000", "01100", "01100", "00000"],
    "-": ["00000", "00000", "00000", "11111", "00000", "00000", "00000"],
    "+": ["00000", "00100", "00100", "11111", "00100", "00100", "00000"],
    "/": ["00001", "00010", "00010", "00100", "01000", "01000", "10000"],
    "%": ["11001", "11010", "00010", "00100", "01000", "01011", "10011"],
    "(": ["00010", "00100", "01000", "01000", "01000", "00100", "00010"],
    ")": ["01000", "00100", "00010", "00010", "00010", "00100", "01000"],
    "=": ["00000", "00000", "11111", "00000", "11111", "00000", "00000"],
    "_": ["00000", "00000", "00000", "00000", "00000", "00000", "11111"],
}

BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (120, 120, 120), (225, 225, 225), (255, 255, 255)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


class Canvas:
    def __init__(self, w, h):
        self.w, self.h = w, h
        self.px = bytearray(WHITE * (w * h))

    def dot(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, width=1, dash=0):
        x0, y0, x1, y1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                for a in range(width):
                    for b in range(width):
                        self.dot(x0 + a - width // 2, y0 + b - width // 2, c)
            n += 1
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x, y, s, c=BLACK, scale=2, anchor="left"):
        width = len(s) * 6 * scale
        if anchor == "right":
            x -= width
        elif anchor == "center":
            x -= width // 2
        for ch in s.upper():
            glyph = FONT.get(ch, FONT[" "])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        for a in range(scale):
                            for b in range(scale):
                                self.dot(x + col * scale + a, y + row * scale + b, c)
            x += 6 * scale

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind, data):
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

        head = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering lo..hi."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    while mag > raw:
        mag /= 10
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = (lo // step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(t)
        t += step
    return ticks


def fmt(v):
    return str(int(v)) if abs(v - round(v)) < 1e-9 else f"{v:.1f}"


def chart(title, xlabel, panels, width=1100, panel_h=240):
    """panels: [{"ylabel", "series": [(label, [(x, y)...])], "hlines": [(label, y)],
    "vlines": [(label, x)], "ymin": optional}]. Returns PNG bytes."""
    left, right, top, gap = 110, 30, 80, 70
    h = top + len(panels) * (panel_h + gap) + 20
    c = Canvas(width, h)
    c.text(width // 2, 20, title, anchor="center")
    xs = [x for p in panels for _, pts in p["series"] for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)
    for i, p in enumerate(panels):
        py = top + i * (panel_h + gap)
        ys = [y for _, pts in p["series"] for _, y in pts] + [y for _, y in p.get("hlines", [])]
        y0 = p.get("ymin", min(ys) if ys else 0)
        y1 = max(ys) if ys else 1
        if y1 - y0 < 1e-9:
            y1 = y0 + 1
        pad = (y1 - y0) * 0.08
        y0, y1 = (y0 - pad if "ymin" not in p else y0), y1 + pad
        pw = width - left - right

        def X(x):
            return left + (x - x0) / (x1 - x0) * pw

        def Y(y):
            return py + panel_h - (y - y0) / (y1 - y0) * panel_h

        for t in nice_ticks(y0, y1):
            c.line(left, Y(t), left + pw, Y(t), LIGHT)
            c.text(left - 8, int(Y(t)) - 7, fmt(t), anchor="right")
        for t in nice_ticks(x0, x1, 8):
            c.line(X(t), py, X(t), py + panel_h, LIGHT)
            c.text(int(X(t)), py + panel_h + 8, fmt(t), anchor="center")
        c.line(left, py, left, py + panel_h, BLACK)
        c.line(left, py + panel_h, left + pw, py + panel_h, BLACK)
        c.text(left, py - 22, p["ylabel"])
        for label, y in p.get("hlines", []):
            c.line(left, Y(y), left + pw, Y(y), GREY, dash=6)
            c.text(left + pw - 4, int(Y(y)) - 18, label, GREY, anchor="right")
        for label, x in p.get("vlines", []):
            c.line(X(x), py, X(x), py + panel_h, GREY, dash=6)
            c.text(int(X(x)) + 6, py + 6, label, GREY)
        lx = left + pw
        for k, (label, pts) in enumerate(reversed(p["series"])):
            colour = COLOURS[(len(p["series"]) - 1 - k) % len(COLOURS)]
            lx -= (len(label) + 3) * 12
            c.line(lx, py - 15, lx + 20, py - 15, colour, width=3)
            c.text(lx + 26, py - 22, label, colour)
        for k, (label, pts) in enumerate(p["series"]):
            colour = COLOURS[k % len(COLOURS)]
            for (a, b), (d, e) in zip(pts, pts[1:]):
                c.line(X(a), Y(b), X(d), Y(e), colour, width=2)
            if len(pts) == 1:
                c.line(X(pts[0][0]), Y(pts[0][1]), X(pts[0][0]), Y(pts[0][1]), colour, width=4)
    c.text(width // 2, h - 22, xlabel, anchor="center")
    return c.png()
