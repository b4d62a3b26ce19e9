"""µs of CPU per socket by table size for each tool, as a dependency-free SVG line chart."""

from __future__ import annotations

import math

COLORS = ["#444444", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd"]


def svg_chart(result: dict, labels: dict[str, str]) -> str:
    sizes = result["sizes"]
    series = {}
    for s in sizes:
        for name, t in s["tools"].items():
            us = t["median"].get("us_per_socket")
            if us is not None:
                series.setdefault(name, []).append((s["sockets"], us))
    W, H, L, R, T, B = 760, 380, 60, 300, 30, 50
    xs = [math.log10(s["sockets"]) for s in sizes] or [4, 6]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    ymax = max([us for pts in series.values() for _, us in pts] + [1.0]) * 1.15

    def px(n: float) -> float:
        return L + (math.log10(n) - x0) / (x1 - x0) * (W - L - R)

    def py(v: float) -> float:
        return T + (1 - v / ymax) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">CPU µs per socket (user+sys) by table size'
           f' — lower is better</text>']
    step = 0.5 if ymax < 4 else 1.0
    v = 0.0
    while v <= ymax:
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    for s in sizes:
        x = px(s["sockets"])
        out.append(f'<text x="{x:.1f}" y="{H - B + 18}" text-anchor="middle">'
                   f'{s["sockets"]:,}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">'
               'sockets in the table (log scale)</text>')
    for i, (name, pts) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{px(n):.1f},{py(us):.1f}"
                        for j, (n, us) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for n, us in pts:
            out.append(f'<circle cx="{px(n):.1f}" cy="{py(us):.1f}" r="3" fill="{c}"/>')
        y = T + 20 + i * 22
        out.append(f'<line x1="{W - R + 15}" x2="{W - R + 35}" y1="{y}" y2="{y}" '
                   f'stroke="{c}" stroke-width="3"/>')
        label = labels.get(name, name).replace("&", "&amp;").replace("<", "&lt;")
        out.append(f'<text x="{W - R + 40}" y="{y + 4}">{label[:42]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
