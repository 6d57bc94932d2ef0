"""``genai evaluate``: sample quality, mode collapse, likelihood and calibration, measured offline.

Sample quality is judged in the feature space of the toolkit's own evaluator network (a run of a family declared
as an evaluator, trained on the same dataset), never with downloaded Inception weights; so its classifier-FID is
not comparable to Inception FID. One module per job:

    metrics     pure functions on feature sets and logits: FID, KID, precision/recall/density/coverage, class
                statistics, ECE and temperature scaling
    network     the evaluator network: found by dataset, loaded frozen, its features and class probabilities
                (what the training loop scores its grids with too)
    evaluator   the evaluator run: resolved from --evaluator RUN or found by dataset, trained on request
    run         evaluating one run: samples, their metrics, bits/dim, diagnostics, appended to metrics.jsonl
    calibrate   --calibrate: a temperature fitted on one half of the validation split, measured on the other
    report      the rich tables, the comparison bar chart, the JSON
"""
