"""The demo's figure: a mosaic of samples per method, columns aligned by NFE.

    >>> path = plot_samples(samples, rows, "out/samples.png", templates=data.means)
    >>> path is None          # matplotlib is not installed: nothing drawn
    False

Layout (3 x 4 panels): the teacher's Euler sampler at 128, 4, 2, 1 steps on the first row; exact data then
the GMFlow students at 4, 2, 1 NFE on the second; the templates (the mixture's means) then the DX students
on the third. Every panel shows the same first samples (the same noise for every sampler).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_samples", "mosaic"]

DISPLAY_RANGE = 1.3  # pixel values are shown clipped to [-1.3, 1.3] (templates are +-0.9, noise std 0.2)


GAP_COLOR = (0.25, 0.45, 0.85)  # blue gaps between tiles: white or black gaps would merge with bars and background


def mosaic(images: torch.Tensor, cols: int, pad: int = 1) -> torch.Tensor:
    """Tile images (N, C, H, W), C = 1 or 3, into one RGB (rows*(H+pad)-pad, cols*(W+pad)-pad, 3) array in [0, 1]."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    x = ((images.float().clamp(-DISPLAY_RANGE, DISPLAY_RANGE) + DISPLAY_RANGE) / (2 * DISPLAY_RANGE)).permute(0, 2, 3, 1)
    x = x.expand(-1, -1, -1, 3) if c == 1 else x[..., :3]
    canvas = torch.tensor(GAP_COLOR).expand(rows * (h + pad) - pad, cols * (w + pad) - pad, 3).clone()
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = x[i]
    return canvas


def plot_samples(
    samples: dict[tuple[str, int], torch.Tensor],
    rows: list[dict],
    path: str | Path,
    templates: torch.Tensor | None = None,
    per_panel: int = 36,
) -> Path | None:
    """Draw the sample mosaics to ``path`` (PNG). Returns the path, or None when matplotlib is missing.

    Args:
        samples: (method, nfe) -> (N, C, H, W) samples; methods "teacher-euler", "data", "piflow-gm", "piflow-dx".
        rows: the result rows (their ``distance`` goes in the panel titles).
        templates: optional (M, C, H, W) mixture means, drawn in the bottom-left panel.
        per_panel: samples per panel (a square number looks best).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dist = {(r["method"], r["nfe"]): r["distance"] for r in rows}
    cols = max(1, round(per_panel**0.5))
    layout = [
        [("teacher-euler", 128), ("teacher-euler", 4), ("teacher-euler", 2), ("teacher-euler", 1)],
        [("data", 0), ("piflow-gm", 4), ("piflow-gm", 2), ("piflow-gm", 1)],
        [("templates", 0), ("piflow-dx", 4), ("piflow-dx", 2), ("piflow-dx", 1)],
    ]
    fig, axes = plt.subplots(len(layout), len(layout[0]), figsize=(2.6 * len(layout[0]), 3.1 * len(layout)))
    for i, line in enumerate(layout):
        for j, key in enumerate(line):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if key[0] == "templates":
                if templates is None:
                    ax.axis("off")
                    continue
                images, title = templates, "templates (mixture means)"
            elif key in samples:
                images = samples[key][:per_panel]
                method, nfe = key
                steps = f"{nfe} step" + ("s" if nfe > 1 else "")
                label = {"teacher-euler": f"teacher Euler {steps}", "data": "exact data"}.get(
                    method, f"pi-Flow {'GM' if method == 'piflow-gm' else 'DX'} {nfe} NFE"
                )
                title = f"{label}\nenergy dist. {dist[key]:.4f}" if key in dist else label
            else:
                ax.axis("off")
                continue
            img = mosaic(images.detach().cpu(), cols if key[0] != "templates" else 4)
            ax.imshow(img.numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=9)
    fig.suptitle("Samples from one noise batch: teacher Euler (top), pi-Flow GMFlow (middle) and DX (bottom)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.5)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
