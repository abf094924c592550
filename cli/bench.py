"""`longdoc bench needle|layers|speed`: JSON with every sample, PNG figures, and a summary table."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from longdoc import LongDocError

from .console import err, fail, progress_bar
from .console import out as stdout
from .options import in_flags, per_method_options

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: needle accuracy, filter layers, speed and memory.")

HERE = Path(__file__).resolve().parent
DEFAULT_BOOKS = Path("../shared/corpus/books")
BUNDLED_MODEL = "examples/models/needle-tiny"
ALL_METHODS = "full,gemfilter,homer,snapkv,streaming,rag,h2o,lingua,kivi-4,kivi-2,gemfilter+kv_bits=4"

Options = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="KEY=VALUE for every method that has KEY, or METHOD.KEY=VALUE."),
]


Books = Annotated[Path | None, typer.Option(help="Folder of .txt books (default ../shared/corpus/books).")]


def _ints(text: str) -> list[int]:
    return [int(x.lower().replace("k", "")) * (1024 if x.lower().endswith("k") else 1) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _versions() -> dict:
    import torch
    import transformers

    import longdoc

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(
        longdoc=longdoc.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        gpu=gpu,
    )


def _write(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["longdoc", *sys.argv[1:]]), "versions": _versions(), **payload}
    path = out / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def _haystacks(books: Path | None, tokenizer, held_out: bool):
    from longdoc.bench.needle import Haystacks, load_books

    folder = books or DEFAULT_BOOKS
    if not folder.is_dir():
        raise LongDocError(f"no book folder at {folder}; pass --books DIR (a folder of .txt files)")
    chosen = load_books(folder, held_out=True) if held_out else {}
    if not chosen:  # a user's folder without the held-out books: use all of it
        chosen = load_books(folder)
    if not chosen:
        raise LongDocError(f"{folder} has no .txt files to cut haystacks from")
    return Haystacks(chosen, tokenizer), sorted(chosen)


def _run(fn, out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        fn()
    except LongDocError as exc:
        fail(in_flags(str(exc)))


@bench_app.command()
def needle(
    model: str = typer.Option(BUNDLED_MODEL, help="Hub id or local folder."),
    methods: str = typer.Option(
        ALL_METHODS, help="Comma-separated methods: names, aliases (kivi-4) or NAME+KEY=VALUE (gemfilter+kv_bits=4)."
    ),
    lengths: str = typer.Option("1024,2048,4096", help="Haystack lengths in tokens (4096 or 4k)."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="Needle depths, 0 = start, 1 = end."),
    needles: int = typer.Option(1, help="Needles per haystack (the question asks about one)."),
    samples: int = typer.Option(5, help="Samples per (length, depth) cell."),
    books: Books = None,
    held_out: bool = typer.Option(True, "--held-out/--all-books", help="Only the needle model's held-out books."),
    top_k: int | None = typer.Option(None, help="Token budget of gemfilter, snapkv, streaming and rag."),
    option: Options = None,
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Same seed, same haystacks for every method."),
    out: Annotated[Path, typer.Option(help="Folder for needle.json and the heatmaps.")] = Path("bench-out"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Needle accuracy of each method over lengths and depths: JSON, a heatmap per method, a summary table."""

    def work():
        from dataclasses import fields

        from longdoc import LongDoc
        from longdoc.bench.evaluate import needle_records
        from longdoc.bench.plots import check_plotting, heatmap
        from longdoc.methods import method_class, split_label

        check_plotting()
        names, length_list, depth_list = _names(methods), _ints(lengths), _floats(depths)
        configs = per_method_options(names, option or [], top_k=top_k)
        base = LongDoc.from_pretrained(model, method="full", device=device)
        haystacks, used_books = _haystacks(books, base.tokenizer, held_out)
        records = []
        with progress_bar(quiet) as bar:
            task = bar.add_task("needle", total=len(names) * len(length_list) * len(depth_list) * samples)
            for name in names:
                # A benchmark compares every method at every length, past the trained window too.
                method_name = split_label(name)[0]
                has_past = "past_window" in {f.name for f in fields(method_class(method_name))}
                past = {"past_window": "true"} if has_past else {}
                doc = base.with_method(method_name, **{**past, **configs[name]})
                for length in length_list:
                    for depth in depth_list:
                        cell = needle_records(
                            doc,
                            haystacks,
                            length=length,
                            needles=needles,
                            samples=samples,
                            depths=[depth],
                            seed=seed,
                            label=name,
                        )
                        for record in cell:
                            record["depth_asked"] = depth
                        records.extend(cell)
                        bar.advance(task, samples)
        summary = _summary(records, names, length_list)
        for name in names:
            cells = {
                (length, depth): _mean(
                    r["correct"]
                    for r in records
                    if r["method"] == name and r["length"] == length and r["depth_asked"] == depth
                )
                for length in length_list
                for depth in depth_list
            }
            heatmap(
                out / f"needle-{name}.png",
                f"{name}, {needles} needle(s), {Path(model).name}",
                length_list,
                depth_list,
                cells,
            )
        path = _write(
            out,
            "needle.json",
            dict(
                model=model,
                books=used_books,
                needles=needles,
                options=configs,
                summary=summary,
                intervals=_intervals(records, names, length_list),
                records=records,
            ),
        )
        _table(
            f"exact answers, {needles} needle(s), {samples} samples per cell (95 % Wilson interval)",
            summary,
            length_list,
            _intervals(records, names, length_list),
        )
        err.print(f"wrote {path} and {len(names)} heatmaps")

    _run(work, out)


@bench_app.command()
def layers(
    model: str = typer.Option(BUNDLED_MODEL, help="Hub id or local folder."),
    lengths: str = typer.Option("2048", help="Haystack lengths in tokens."),
    needles: int = typer.Option(4, help="Needles per haystack (4: as `longdoc tune` scores layers)."),
    samples: int = typer.Option(10, help="Samples per (layer, length)."),
    books: Books = None,
    held_out: bool = typer.Option(True, "--held-out/--all-books"),
    top_k: int = typer.Option(256, help="GemFilter's context tokens kept."),
    option: Options = None,
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    out: Annotated[Path, typer.Option(help="Folder for layers.json and layers.png.")] = Path("bench-out"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """GemFilter accuracy against filter layer, to find the layer for any model.

    The plot is exact answers; the best layer is `longdoc tune`'s: exact and grounded answers (the asked needle the
    strongest evidence), half each, the earliest of equals."""

    def work():
        from longdoc import LongDoc
        from longdoc.bench.plots import check_plotting, lines
        from longdoc.tune import best_layer, layer_series, mean_score, score, sweep_filter_layer

        check_plotting()
        length_list = _ints(lengths)
        config = per_method_options(["gemfilter"], option or [], top_k=top_k)["gemfilter"]
        if "filter_layer" in config:
            raise LongDocError("bench layers sweeps filter_layer itself; do not pass it")
        base = LongDoc.from_pretrained(model, method="full", device=device)
        haystacks, used_books = _haystacks(books, base.tokenizer, held_out)
        num_layers = base.arch.num_layers
        with progress_bar(quiet) as bar:
            task = bar.add_task("layers", total=num_layers)
            advance = lambda stage, done, total: bar.update(task, completed=done)  # noqa: E731
            by_length, records = sweep_filter_layer(
                base, haystacks, config, length_list, samples, seed, advance, needles=needles
            )
        series = {f"{length} tokens": by_length[length] for length in length_list}
        mean = {layer: mean_score(by_length, layer) for layer in range(num_layers)}
        by_score = layer_series(records, by_length, score)  # tune's score, chosen as tune chooses
        scores = {layer: mean_score(by_score, layer) for layer in range(num_layers)}
        best = best_layer(by_score)
        lines(
            out / "layers.png", f"GemFilter filter layer, {Path(model).name}", "filter layer", "exact answers", series
        )
        path = _write(
            out,
            "layers.json",
            dict(
                model=model, books=used_books, options=config, needles=needles, accuracy=series, score=scores,
                best_layer=best, records=records,
            ),
        )  # fmt: skip
        table = Table("filter layer", *series, "mean", "score")
        for layer in range(num_layers):
            mark = " <- best" if layer == best else ""
            row = [f"{series[s][layer]:.2f}" for s in series]
            table.add_row(str(layer), *row, f"{mean[layer]:.2f}", f"{scores[layer]:.2f}{mark}")
        stdout.print(table)
        err.print(f"best filter layer: {best} (score {scores[best]:.2f}, exact {mean[best]:.2f}); wrote {path}")

    _run(work, out)


@bench_app.command()
def speed(
    shape: str = typer.Option("llama-3.1-8b", help="llama-3.1-8b, qwen2.5-7b, mistral-nemo-12b (or tiny)."),
    lengths: str = typer.Option("8k,32k", help="Prompt lengths in tokens (8192 or 8k)."),
    methods: str = typer.Option("full,gemfilter,homer,snapkv", help="Comma-separated methods (not rag)."),
    runs: int = typer.Option(3, help="Timed runs after one warm-up; medians are reported."),
    decode_tokens: int = typer.Option(32, help="Tokens decoded to measure decode speed (at least 3)."),
    graph: bool = typer.Option(True, help="Decode with a CUDA graph (--no-graph: the eager loop)."),
    compile: bool = typer.Option(
        False, "--compile", help="Capture the torch.compile'd decode step (~half a minute to compile per cache size)."
    ),
    reference: bool = typer.Option(
        True, help="Also time transformers' own forward and model.generate at each length (row 'transformers')."
    ),
    top_k: int | None = typer.Option(None, help="Token budget of gemfilter, snapkv and streaming."),
    questions: int = typer.Option(
        0, help="Also read once, ask N questions (full, gemfilter): first and follow-up TTFT, reading size, save/load."
    ),
    option: Options = None,
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (bf16 on CUDA, float32 on CPU)."),
    out: Annotated[Path, typer.Option(help="Folder for speed.json and speed.png.")] = Path("bench-out"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Time to first token, decode tokens/s and peak GPU memory over the weights, on a random model of a real shape."""

    def work():
        from longdoc.bench.plots import check_plotting, lines
        from longdoc.bench.shapes import SHAPES
        from longdoc.bench.speed import reading_records, speed_records
        from longdoc.model import resolve_device

        check_plotting()
        if shape not in SHAPES:
            raise LongDocError(f"unknown shape '{shape}'; choose from: {', '.join(SHAPES)}")
        names = _names(methods)
        if "rag" in names or "lingua" in names:
            raise LongDocError("speed runs on random token ids; rag and lingua rank real text (use bench needle)")
        configs = per_method_options(names, option or [], top_k=top_k)
        length_list = _ints(lengths)
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"speed {shape}", total=len(length_list) * len(names))
            records, info = speed_records(
                shape,
                length_list,
                configs,
                runs=runs,
                decode_tokens=decode_tokens,
                device=resolve_device(device),
                progress=lambda stage, done, total: bar.update(task, completed=done),
                reference=reference,
                graph=graph,
                compile=compile,
            )
        series = {
            name: {r["length"]: r["ttft_seconds"] for r in records if r["method"] == name and "ttft_seconds" in r}
            for name in names + (["transformers"] if reference else [])
        }
        lines(out / "speed.png", f"time to first token, {shape} ({info['device']})", "tokens", "seconds", series, True)
        path = _write(out, "speed.json", dict(**info, records=records))
        table = Table(
            "tokens",
            "method",
            "TTFT s",
            "x full",
            "decode tok/s",
            "floor tok/s",
            "peak over weights GiB",
            "kept",
            "cache MiB",
        )
        full = {r["length"]: r for r in records if r["method"] == "full" and "ttft_seconds" in r}
        for r in records:
            if "ttft_seconds" not in r:
                table.add_row(str(r["length"]), r["method"], "OOM" if r["oom"] else "error", "", "", "", "", "")
                continue
            ratio = f"{r['ttft_seconds'] / full[r['length']]['ttft_seconds']:.2f}" if r["length"] in full else ""
            peak = r["peak_bytes_over_weights"]
            floor = "-"
            if "fraction_of_floor" in r:
                floor = f"{r['floor_tokens_per_second']:.0f} ({r['fraction_of_floor']:.0%})"
            table.add_row(
                str(r["length"]),
                r["method"],
                f"{r['ttft_seconds']:.3f}",
                ratio,
                f"{r['decode_tokens_per_second']:.1f}",
                floor,
                f"{peak / 2**30:.2f}" if peak is not None else "-",
                str(r["tokens_kept"]),
                f"{r['cache_bytes'] / 2**20:.1f}" if "cache_bytes" in r else "-",
            )
        stdout.print(table)
        err.print(f"wrote {path}")
        if questions:
            _reading_table(reading_records, shape, length_list, configs, questions, resolve_device(device), out)

    _run(work, out)


def _reading_table(reading_records, shape, lengths, configs, questions, device, out: Path) -> None:
    """Read once, ask `questions`: first vs follow-up TTFT, reading size, save/load, as a table and reading.json."""
    from longdoc.methods import method_class, split_label

    # full, gemfilter and their rows with options (kivi-4, gemfilter+kv_bits=4: a quantized reading)
    reusable = {name: options for name, options in configs.items() if method_class(split_label(name)[0]).reusable}
    records, info = reading_records(shape, lengths, reusable, questions, device, folder=str(out))
    path = _write(out, "reading.json", dict(**info, records=records))
    table = Table(
        "tokens", "method", "first TTFT s", "follow-up TTFT s", "from host s", "reading GiB", "save s", "load s"
    )
    for r in records:
        if "first_ttft_seconds" not in r:
            table.add_row(str(r["length"]), r["method"], "OOM" if r.get("oom") else r.get("error", ""), *[""] * 5)
            continue
        table.add_row(
            str(r["length"]),
            r["method"],
            f"{r['first_ttft_seconds']:.3f}",
            f"{r['follow_up_ttft_seconds']:.3f}",
            f"{r['follow_up_from_host_ttft_seconds']:.3f}" if r["follow_up_from_host_ttft_seconds"] else "-",
            f"{r['reading_bytes'] / 2**30:.2f}",
            f"{r['save_seconds']:.2f}",
            f"{r['load_seconds']:.2f}",
        )
    stdout.print(table)
    err.print(f"wrote {path}")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _summary(records: list[dict], names: list[str], lengths: list[int]) -> dict:
    return {
        name: {
            str(length): _mean(r["correct"] for r in records if r["method"] == name and r["length"] == length)
            for length in lengths
        }
        for name in names
    }


def _intervals(records: list[dict], names: list[str], lengths: list[int]) -> dict:
    """Per method and length: answers counted, correct, and the 95 % Wilson interval of the accuracy."""
    from longdoc.bench.evaluate import wilson

    cells = {}
    for name in names:
        cells[name] = {}
        for length in lengths:
            cell = [r["correct"] for r in records if r["method"] == name and r["length"] == length]
            low, high = wilson(sum(cell), len(cell))
            cells[name][str(length)] = dict(n=len(cell), correct=sum(cell), low=round(low, 3), high=round(high, 3))
    return cells


def _table(title: str, summary: dict, lengths: list[int], intervals: dict | None = None) -> None:
    table = Table("method", *[str(length) for length in lengths], "mean", title=title)
    for name, row in summary.items():
        values = [row[str(length)] for length in lengths]
        cells = [f"{v:.2f}" for v in values]
        if intervals:
            cells = [
                f"{v:.2f} ({c['low']:.2f}-{c['high']:.2f}, n={c['n']})"
                for v, c in zip(values, (intervals[name][str(length)] for length in lengths), strict=True)
            ]
        table.add_row(name, *cells, f"{_mean(values):.2f}")
    stdout.print(table)
