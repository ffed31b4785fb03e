"""Render an assessment as one self-contained HTML file (owner side).

No template engine and no external assets: the leakage curves are inline SVG, the images inline
PNG data URIs, so the report can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np
import torch
from PIL import Image

from .recommend import point_verdict

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}tr.rec{background:#e6f4e6;font-weight:bold}
.fail{color:#a00}.ok{color:#070}.imgs img{width:64px;height:64px;image-rendering:pixelated;margin:1px;border:1px solid #ddd}
.row{display:flex;align-items:center;gap:.5em;margin:2px 0}.row span{width:11em;font-size:.8em}
svg text{font-size:11px}.box{background:#f8f8f8;padding:.6em 1em;border-left:4px solid #4a4}
"""


def _png(img: torch.Tensor) -> str:
    """(C, H, W) in [0, 1], C in {1, 3} -> PNG data URI."""
    arr = (img.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _imgs(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return "".join(f'<img src="{_png(t[i])}" alt="">' for i in range(t.shape[0]))


def _chart(title: str, xs: list[int], series: list[tuple[str, list[float | None], str]], hline: tuple[str, float] | None,
           ylabel: str, band: tuple[list[float], list[float]] | None = None, log: bool = False) -> str:
    """A small line chart over partition points; `series` are (label, values, colour)."""
    w, h, ml, mr, mt, mb = 560, 260, 55, 150, 25, 40
    vals = [v for _, s, _ in series for v in s if v is not None and math.isfinite(v)]
    if band:
        vals += [v for v in band[0] + band[1] if math.isfinite(v)]
    if hline:
        vals.append(hline[1])
    if not vals or not xs:
        return ""
    f = (lambda v: math.log10(max(v, 1e-4))) if log else (lambda v: v)
    lo, hi = min(f(v) for v in vals), max(f(v) for v in vals)
    if not log:
        lo = min(lo, 0.0)
    if hi - lo < 1e-9:
        hi = lo + 1
    x0, x1 = min(xs), max(xs)
    sx = (lambda x: ml + (w - ml - mr) * (0.5 if x1 == x0 else (x - x0) / (x1 - x0)))
    sy = (lambda v: mt + (h - mt - mb) * (1 - (f(v) - lo) / (hi - lo)))
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{ml}" y="15" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#888"/>',
           f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#888"/>']
    for x in xs:
        out.append(f'<text x="{sx(x):.1f}" y="{h - mb + 14}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 5}" text-anchor="middle">partition point (FrontNet layers)</text>')
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        lab = f"{10 ** v:.3g}" if log else f"{v:.2f}"
        y = mt + (h - mt - mb) * (1 - i / 4)
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end">{lab}</text>')
    out.append(f'<text x="12" y="{(mt + h - mb) / 2}" transform="rotate(-90 12 {(mt + h - mb) / 2})" text-anchor="middle">{html.escape(ylabel)}</text>')
    if band:
        pts = [(sx(x), sy(v)) for x, v in zip(xs, band[1])] + [(sx(x), sy(v)) for x, v in reversed(list(zip(xs, band[0])))]
        out.append('<polygon fill="#cde" stroke="none" points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
    legend_y = mt
    if hline:
        y = sy(hline[1])
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="#c00" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{w - mr + 6}" y="{legend_y + 4}" fill="#c00">{html.escape(hline[0])}</text>')
        legend_y += 16
    for label, s, colour in series:
        pts = [(sx(x), sy(v)) for x, v in zip(xs, s) if v is not None and math.isfinite(v)]
        if not pts:
            continue
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in pts]
        out.append(f'<text x="{w - mr + 6}" y="{legend_y + 4}" fill="{colour}">{html.escape(label)}</text>')
        legend_y += 16
    out.append("</svg>")
    return "".join(out)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _kl_verdict(kl: dict) -> str:
    ci = kl.get("ci")
    if not ci:
        return "leaks" if kl.get("leaks") else ("-" if not kl else "passes")
    text = f"{ci['verdict']} ({ci['lower']:+.2f}..{ci['upper']:+.2f})"
    if ci["verdict"] == "undecided":
        n = ci.get("samples_needed")
        text += f", needs {n} samples" if n is not None else ", no sample size decides it"
    return text


def _time_table(record: dict) -> str:
    """Where the time went: wall and process CPU seconds per phase (older records: wall only)."""
    t = record.get("time_breakdown")
    if not t:
        return "<h2>Where the time went (s)</h2><pre>" + html.escape(json.dumps(record["timings_s"], indent=1)) + "</pre>"
    load = record.get("load_average") or {}
    rows = "".join(f"<tr><td class='l'>{html.escape(k)}</td><td>{v['wall_s']:.1f}</td><td>{v['cpu_s']:.1f}</td>"
                   f"<td>{v['share']:.0%}</td></tr>" for k, v in t.items())
    note = (f" Load average (1, 5, 15 min) at the start {load.get('start')}, at the end {load.get('end')}: on a shared "
            "machine the CPU seconds say more than the wall seconds.") if load else ""
    if "tests" in t:
        note += (" The tests run at once inside `tests` (one shared pool of cores): their wall spans overlap, and"
                 " each test's CPU seconds are its own threads' and pool items'.")
    return (f"<h2>Where the time went</h2><p>Wall and process CPU seconds per phase; {record.get('torch_threads', '?')} "
            f"torch threads.{html.escape(note)}</p><table><tr><th>phase</th><th>wall s</th><th>CPU s</th><th>share of wall</th></tr>"
            + rows + "</table>")


def render(record: dict, images: dict[int, dict[str, torch.Tensor]], originals: torch.Tensor | None) -> str:
    """The whole report as an HTML string."""
    pts = record["points"]
    xs = [p["index"] for p in pts]
    thr = record["ssim_threshold"]
    rec = record.get("recommended")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>enclaveml assessment: {html.escape(str(record['model']))}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Partition assessment of <code>{html.escape(str(record['model']))}</code></h1>",
             f"<p>Input {record['input_shape']}, {record['classes']} classes; data: {html.escape(record['data'])}."
             + (f" Top-1 on the test samples: {record['sample_accuracy']:.1%}." if record.get("sample_accuracy") is not None else "")
             + f" Wall time {record['timings_s'].get('total', 0):.1f} s.</p>"]
    reason = html.escape(record["recommendation"]["reason"])
    if rec is None:
        parts.append(f"<p class='box fail'><b>No recommendation.</b> {reason}</p>")
    else:
        name = next(p["name"] for p in pts if p["index"] == rec)
        parts.append(f"<p class='box'><b>Recommended partition point: {rec}</b> (FrontNet = layers 0..{rec - 1}, "
                     f"ending with <code>{html.escape(name)}</code>). {reason}. Override with <code>--point K</code>.</p>")

    # leakage curves
    kl_pts = [p for p in pts if p.get("kl")]
    if kl_pts:
        kx = [p["index"] for p in kl_pts]
        parts.append("<h2>KL test (dual network)</h2><p>delta_k(x) = min over IR channels of KL(F(x) || F(channel image)), "
                     "median over samples with the inter-quartile band; a point leaks when channels beat the uniform "
                     "baseline on more samples than the channels of another test image do (permutation control).</p>")
        parts.append(_chart("KL divergence per point (log scale)", kx,
                            [("delta_k median", [p["kl"]["delta"]["median"] for p in kl_pts], "#15c"),
                             ("KL(F(x)||uniform)", [p["kl"]["uniform"] for p in kl_pts], "#c60")], None, "KL (nats)",
                            band=([p["kl"]["delta"]["q25"] for p in kl_pts], [p["kl"]["delta"]["q75"] for p in kl_pts]), log=True))
        parts.append(_chart("Samples where a channel beats uniform", kx,
                            [("channel beats uniform", [p["kl"]["leak_fraction"] for p in kl_pts], "#15c"),
                             ("another image's channels (control)", [p["kl"]["chance_fraction"] for p in kl_pts], "#888")], None, "fraction"))
        ci_pts = [p for p in kl_pts if p["kl"].get("ci")]
        if ci_pts:
            ci0 = ci_pts[0]["kl"]["ci"]
            parts.append(f"<p>The verdict: own-channel share minus control share per point, with its {ci0['confidence']:.0%} "
                         "confidence interval (Newcombe's paired score interval; shaded). A point passes the KL test only when "
                         "the whole interval lies at or below the tolerance, leaks when it lies above, and is "
                         "<i>undecided</i> otherwise; the table says how many samples would decide it.</p>")
            parts.append(_chart(f"KL leakage statistic with {ci0['confidence']:.0%} CI", [p["index"] for p in ci_pts],
                                [("own - control", [p["kl"]["ci"]["difference"] for p in ci_pts], "#15c")],
                                (f"tolerance {ci0['tolerance']:g}", ci0["tolerance"]), "share difference",
                                band=([p["kl"]["ci"]["lower"] for p in ci_pts], [p["kl"]["ci"]["upper"] for p in ci_pts])))
    inv_pts = [p for p in pts if p.get("inversion")]
    if inv_pts:
        attacks = sorted({a for p in inv_pts for a in p["inversion"]["attacks"]})
        colours = ["#15c", "#2a2", "#a3a", "#c60"]
        series = [(a, [p["inversion"]["attacks"].get(a, {}).get("ssim") for p in inv_pts], colours[i % 4]) for i, a in enumerate(attacks)]
        parts.append("<h2>Inversion attacks</h2><p>SSIM between the test inputs and their reconstructions from IR_k; "
                     f"at or below {thr} the reconstruction is unrecognisable (He et al., ACSAC 2019).</p>")
        parts.append(_chart("Reconstruction SSIM per point", [p["index"] for p in inv_pts], series, (f"threshold {thr}", thr), "SSIM"))

    # table
    parts.append("<h2>Per point</h2><table><tr><th>k</th><th>last layer</th><th>IR shape</th><th>KL delta median</th>"
                 "<th>KL uniform</th><th>beats uniform</th><th>control</th><th>KL verdict (CI)</th><th>SSIM (attack)</th><th>PSNR dB</th>"
                 "<th>params</th><th>MFLOPs</th><th>enclave memory</th><th>latency ms</th><th>verdict</th></tr>")
    for p in pts:
        kl, inv, c = p.get("kl") or {}, p.get("inversion") or {}, p["cost"]
        fails = point_verdict(p, thr)
        verdict = "<span class='ok'>pass</span>" if not fails else "<span class='fail'>" + html.escape("; ".join(fails)) + "</span>"
        cls = " class='rec'" if p["index"] == rec else ""
        parts.append(
            f"<tr{cls}><td>{p['index']}</td><td class='l'>{html.escape(p['name'])}</td><td>{'x'.join(map(str, p['ir_shape']))}</td>"
            f"<td>{kl.get('min', float('nan')):.4g}</td><td>{kl.get('uniform', float('nan')):.4g}</td>"
            f"<td>{kl.get('leak_fraction', float('nan')):.0%}</td><td>{kl.get('chance_fraction', float('nan')):.0%}</td>"
            f"<td class='l'>{html.escape(_kl_verdict(kl))}</td>"
            f"<td>{inv.get('ssim', float('nan')):.3f} ({html.escape(str(inv.get('attack', '-')))})</td><td>{inv.get('psnr', float('nan')):.1f}</td>"
            f"<td>{c['params']:,}</td><td>{c['flops'] / 1e6:.1f}</td><td>{_fmt_bytes(c['enclave_bytes'])}</td>"
            f"<td>{c['latency_ms']:.3f}</td><td class='l'>{verdict}</td></tr>")
    parts.append("</table>")

    # pictures
    parts.append("<h2>IR channels and reconstructions</h2><p>Channels: the first test sample's IR channels the oracle "
                 "found closest to F(x). Reconstructions: the first test samples, rebuilt from their IR by each attack.</p><div class='imgs'>")
    if originals is not None:
        parts.append(f"<div class='row'><span>originals</span>{_imgs(originals)}</div>")
    for p in pts:
        imgs = images.get(p["index"], {})
        parts.append(f"<h3>point {p['index']} ({html.escape(p['name'])})</h3>")
        for key, t in imgs.items():
            parts.append(f"<div class='row'><span>{html.escape(key)}</span>{_imgs(t)}</div>")
    parts.append("</div>")
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(record["config"], indent=1)) + "</pre>")
    parts.append(_time_table(record))
    parts.append("</body></html>")
    return "\n".join(parts)
