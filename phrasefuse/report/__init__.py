"""WORK/report.html: one self-contained page (plots and thumbnails inlined) that opens from
disk, and the plots as PNG files in WORK/plots/.

Sections: the ablation (table and bars), the few-shot curves, the heads (validation and
test, fused against image-only, and why the saved one was saved), the zero-shot label
prior, the confusion matrix (per-class shares) of the fused head with the highest test
score, a gallery of test images, each with its generated phrases and scores, its true label
and the image-only and fused predictions side by side: where text fixed a prediction, and
where it broke one, counted from the two heads' prediction files; and the words it uses
(README's). Every figure names its split and its head.

The page is `report.page.write_report`, its plots `report.plots`. `phrasefuse.run` calls it
last, with the run's heads: nothing here imports `run`.
"""

BASELINE = "image-only"  # the head the report compares every fused head with
