"""`longdoc tune`: measure a model's best GemFilter settings and HOMER's calibration, for its profile.

Accuracy is the needle task (bench/needle.py: a fact hidden in book text, asked for by name), the one
`longdoc bench layers` plots (exact answers per layer; it names the best layer by `score` too). GemFilter is scored
(`score`) on haystacks of NEEDLES needles by exact answers and by grounded answers (exact, with the asked needle as
the strongest evidence), half each. Every filter layer is swept with each scoring preset (PRESETS), then each
scoring option the caller did not fix is flipped in turn at the best layer (kept when it scores more), and the
layers are swept again if the scoring changed. HOMER: the positional calibration is measured on plain book text;
with and without it, chunks of half the window (the default) and of the whole window are tried past the window,
and the pair that answers the most needles is kept.
"""

from __future__ import annotations

from .bench.evaluate import accuracy, grounded, needle_records
from .calibration import FILE_NAME as CALIBRATION_FILE
from .calibration import measure, save, text_windows
from .errors import LongDocError
from .progress import ProgressHook, no_progress

# Scoring alternatives tried at the best layer: (option, default value, alternative).
SCORING = [("score", "logits", "softmax"), ("query_tokens", 1, 16), ("pool_kernel", 5, 41)]
# Layers are swept with each preset: the paper's scoring (the defaults) and one for small models whose few
# retrieval heads are swamped by other heads' logits. Measured on the bundled needle model (its card): with the
# paper's single query every layer scores 0.02-0.10, so flipping one option at a time from it finds nothing.
PRESETS = [{}, {"score": "softmax", "query_tokens": 16, "pool_kernel": 41}]
# Needles per tuning haystack. With one, every layer that keeps the needle ties, and the earliest wins even where
# the model cannot yet tell keys apart: needle-small's layers 2-4 keep all four needles of a 3500-token haystack
# (exact answers 1.00) but rank the asked one first in 45-55 % of them, layer 5 in 90 %, layer 6 in 100 % (20
# samples each, the paper's scoring, top_k 256).
NEEDLES = 4


def sweep_filter_layer(
    base,
    haystacks,
    options: dict,
    lengths: list[int],
    samples: int,
    seed: int = 0,
    progress: ProgressHook = no_progress,
    needles: int = 1,
    metric=accuracy,
) -> tuple[dict[int, dict[int, float]], list[dict]]:
    """GemFilter's `metric` (exact answers, or tune's `score`) at every filter layer: ({length: {layer: value}},
    records)."""
    base = unprofiled(base)
    series: dict[int, dict[int, float]] = {length: {} for length in lengths}
    records = []
    layers = base.arch.num_layers
    for layer in range(layers):
        doc = base.with_method("gemfilter", **{**options, "filter_layer": layer})
        for length in lengths:
            cell = needle_records(doc, haystacks, length=length, needles=needles, samples=samples, seed=seed)
            for record in cell:
                record["filter_layer"] = layer
            records.extend(cell)
            series[length][layer] = metric(cell)
        progress("filter layers", layer + 1, layers)
    return series, records


def unprofiled(base):
    """The same loaded model without its profile: a sweep measures the options it is given, not the old profile's."""
    from .api import LongDoc

    return LongDoc(base.model, base.tokenizer, "full", base.system_prompt, store=base.store)


def mean_score(series: dict[int, dict[int, float]], layer: int) -> float:
    return sum(by_layer[layer] for by_layer in series.values()) / len(series)


def best_layer(series: dict[int, dict[int, float]]) -> int:
    """The best-scoring layer; the earliest of equals (an earlier layer is a cheaper first pass)."""
    layers = next(iter(series.values()))
    return max(layers, key=lambda layer: (mean_score(series, layer), -layer))


def score(records: list[dict]) -> float:
    """Tune's GemFilter score: exact answers and grounded answers (`grounded`), half each. Grounded alone ties wherever
    a model cannot put the asked needle first, and then the earliest layer wins: needle-tiny's layers all score 0.06
    grounded on four needles (card preset, 16 samples of 2048 tokens) while layer 7 answers 0.38 exactly and layer 0
    0.06."""
    return (accuracy(records) + grounded(records)) / 2


def layer_series(records: list[dict], series: dict[int, dict[int, float]], metric) -> dict[int, dict[int, float]]:
    """`metric` of a sweep's records per length and filter layer (the lengths and layers of `series`)."""
    return {
        n: {k: metric([r for r in records if r["length"] == n and r["filter_layer"] == k]) for k in by_layer}
        for n, by_layer in series.items()
    }


def as_json(series: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    """A series as the profile stores it (JSON keys are strings)."""
    return {str(n): {str(k): v for k, v in by_layer.items()} for n, by_layer in series.items()}


def tune_gemfilter(base, haystacks, options: dict, lengths: list[int], samples: int, seed: int, progress) -> dict:
    """The profile entry for gemfilter: options, their score, exact and grounded answers, and how they were measured."""

    def sweep(trial: dict) -> tuple[dict[int, dict[int, float]], list[dict]]:
        return sweep_filter_layer(base, haystacks, trial, lengths, samples, seed, progress, NEEDLES, score)

    fixed = set(options)
    best = -1.0
    for preset in PRESETS:  # the caller's options win over a preset's
        trial = {**preset, **options}
        trial_series, trial_records = sweep(trial)
        trial_layer = best_layer(trial_series)
        if mean_score(trial_series, trial_layer) > best:
            series, records, layer, chosen = trial_series, trial_records, trial_layer, trial
            best = mean_score(trial_series, trial_layer)
    options, changed = dict(chosen), False
    for done, (name, default, alternative) in enumerate(SCORING, start=1):
        if name in fixed:  # the caller's `-o` options are held fixed
            progress("scoring", done, len(SCORING))
            continue
        current = options.get(name, default)
        trial = {**options, name: alternative if current == default else default, "filter_layer": layer}
        doc = base.with_method("gemfilter", **trial)
        cells = [needle_records(doc, haystacks, length=n, needles=NEEDLES, samples=samples, seed=seed) for n in lengths]
        trial_score = sum(score(cell) for cell in cells) / len(lengths)
        progress("scoring", done, len(SCORING))
        if trial_score > best:
            options[name], best, changed = trial[name], trial_score, True
    if changed:  # the best layer may move with the scoring
        series, records = sweep(options)
        layer = best_layer(series)
        best = mean_score(series, layer)
    chosen_records = [r for r in records if r["filter_layer"] == layer]
    return dict(
        options={**options, "filter_layer": layer},
        score=round(best, 4),
        accuracy=round(accuracy(chosen_records), 4),
        grounded=round(grounded(chosen_records), 4),
        needles=NEEDLES,
        samples=samples * len(lengths),
        lengths=lengths,
        layer_score=as_json(series),  # the sweep's own metric
        layer_accuracy=as_json(layer_series(records, series, accuracy)),
        layer_grounded=as_json(layer_series(records, series, grounded)),
    )


def tune_homer(base, haystacks, texts: list[str], folder, samples: int, seed: int, progress) -> dict:
    """The profile entry for homer: calibration (measured on `texts`, or off) and chunk length (the default, half the
    window, or the whole window), the pair that answers the most needles past the window; ties keep the earlier
    trial (calibrated before uncalibrated, the default chunk before the window)."""
    from .methods.homer import default_chunk_len

    length = default_chunk_len(base.arch)
    windows = text_windows(base.tokenizer, texts, length, samples, seed)
    bias = measure(base.arch, windows, progress)
    path = save(folder / CALIBRATION_FILE, bias, source="longdoc tune", samples=samples)
    window = base.arch.trained_window
    if not window:
        return dict(options={"calibration": CALIBRATION_FILE}, note="the model does not say its window: not measured")
    past = window + window // 2  # past the window, where auto hands the prompt to homer
    trials = max(2, samples // 2)
    chunks = [None] + ([window] if window > length else [])  # None: the default, half the window
    candidates = [(calibration, chunk) for chunk in chunks for calibration in (str(path), "off")]
    scores = {}
    for done, (calibration, chunk) in enumerate(candidates, start=1):
        options = dict(calibration=calibration, **({"max_chunk_len": chunk} if chunk else {}))
        doc = base.with_method("homer", **options)
        scores[calibration, chunk] = accuracy(needle_records(doc, haystacks, length=past, samples=trials, seed=seed))
        progress("homer", done, len(candidates))
    calibration, chunk = max(candidates, key=lambda c: scores[c])  # max keeps the first of equals
    options = {"calibration": CALIBRATION_FILE if calibration == str(path) else "off"}
    if chunk:
        options["max_chunk_len"] = chunk
    return dict(
        options=options,
        accuracy=round(scores[calibration, chunk], 4),
        samples=trials,
        lengths=[past],
        uncalibrated_accuracy=scores["off", None],
        calibrated_accuracy=scores[str(path), None],
        trials=[
            dict(calibration="measured" if c == str(path) else "off", max_chunk_len=n or length, accuracy=scores[c, n])
            for c, n in candidates
        ],
    )


def tune(base, haystacks, texts: list[str], folder, *, samples: int, lengths: list[int], options: dict, seed=0,
         progress: ProgressHook = no_progress) -> dict:  # fmt: skip
    """A profile's data for the model loaded in `base` (a LongDoc)."""
    from . import __version__

    if "filter_layer" in options:
        raise LongDocError("tune sweeps filter_layer itself; do not pass it")
    base = unprofiled(base)
    gemfilter = tune_gemfilter(base, haystacks, options, lengths, samples, seed, progress)
    homer = tune_homer(base, haystacks, texts, folder, samples, seed, progress)
    return dict(
        model=str(getattr(base.arch.config, "_name_or_path", "")),
        longdoc=__version__,
        measured_on=(
            f"needles in held-out books (longdoc.bench.needle): gemfilter on haystacks of {NEEDLES} needles by exact"
            " and grounded answers (exact, the asked needle the strongest evidence), half each; homer by exact answers"
        ),
        methods=dict(gemfilter=gemfilter, homer=homer),
        auto=dict(within="gemfilter"),
    )
