"""The README's editing pictures: every zero-shot editing task of the sampling command on the digits,
with a consistency model and with an EDM teacher, as one PNG per task.

  python bench/editing_pictures.py --cm=runs/digits_ict --edm=runs/digits_edm --out=docs/editing

Each PNG has a block per model (rows: the held-out input, what the editor sees, the result); the
commands run are those of the README (``python -m consistency_jax.sample --edit=...``), called in
process. Colorization needs an RGB model and is not part of the digits pictures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw  # noqa: E402

from consistency_jax import sample as sample_lib  # noqa: E402

TASKS = {
    "inpaint": dict(mask="center_box"),
    "inpaint_strokes": dict(mask="random_strokes"),
    "superres": dict(patch_size=2),
    "sdedit": dict(edit_sigma=2.0),
    "denoise": dict(edit_sigma=0.6, noise_inputs=True),
    "interpolate": dict(num_alphas=8),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cm", required=True, help="a consistency-model run (e.g. digits iCT or CD)")
    p.add_argument("--edm", default="", help="an EDM teacher run, for comparison")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=8)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = [("consistency model (" + os.path.basename(args.cm.rstrip("/")) + ")", args.cm)]
    if args.edm:
        runs.append(
            (
                "EDM teacher, Heun 18 steps (" + os.path.basename(args.edm.rstrip("/")) + ")",
                args.edm,
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        for task, extra in TASKS.items():
            blocks = []
            for label, workdir in runs:
                edit = "inpaint" if task.startswith("inpaint") else task
                request = sample_lib.SampleRequest(
                    workdir=workdir,
                    out=os.path.join(tmp, task, os.path.basename(workdir)),
                    num_samples=args.count,
                    edit=edit,
                    seed=0,
                    inputs="" if edit == "interpolate" else "tfds:sklearn_digits/8:test",
                    **extra,
                )
                summary = sample_lib.run_edit(request)
                blocks.append((label, Image.open(summary["png"]).convert("RGB")))
                print(task, label, summary["png"], flush=True)
            width = max(b.width for _, b in blocks) + 20
            height = sum(b.height + 24 for _, b in blocks) + 30
            canvas = Image.new("RGB", (width, height), "white")
            draw = ImageDraw.Draw(canvas)
            draw.text((10, 6), f"{task}: {extra}", fill="black")
            y = 30
            for label, block in blocks:
                draw.text((10, y), label, fill="black")
                canvas.paste(block, (10, y + 16))
                y += block.height + 24
            canvas.save(os.path.join(args.out, f"{task}.png"))


if __name__ == "__main__":
    main()
