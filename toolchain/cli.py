"""The `toolchain` command: a thin layer of click commands over the library.

Errors a user can cause print one line on stderr and exit with status 2
(tracebacks only with --debug); the contract is docs/cli.md.
"""

from __future__ import annotations

import json
import math
import shlex
import signal
import sys

import click

from . import registry, settings
from .errors import ToolchainError

DATA_HELP = "CIFAR-10 folder (cifar-10-batches-py or train/ and test/ image folders); default: $CIFAR10_ROOT"


class Ratio(click.ParamType):
    """The fraction of filters removed from each clustered layer, strictly between 0 and 1."""

    name = "ratio"

    def convert(self, value, param, ctx):
        try:
            r = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; give a ratio between 0 and 1, e.g. 0.5", param, ctx)
        if math.isnan(r) or not 0 < r < 1:
            self.fail(f"{value} is not between 0 and 1 (exclusive); 0.5 removes half the filters",
                      param, ctx)
        return r


def compression_options(command):
    """The methods' own options, shared by export and sweep: each method's config takes those it has
    (toolchain.methods.first.FirstConfig, ...), and ExportConfig.reconstruct."""
    command = click.option(
        "--no-reconstruct", is_flag=True,
        help="Skip the least-squares refit on calibration images (method first: centroids; second: each "
             "block's convs and the classifier) and only recalibrate BatchNorm statistics.")(command)
    command = click.option(
        "--keep", type=click.Choice(settings.KEEP), default=settings.KEEP[0], show_default=True,
        help="Method second: salient: the conv1 filters of largest L1 norm are the clusters' centres and "
             "every other filter joins the nearest; or K-Means clusters, each kept as the member closest to "
             "its centroid (medoid), the centroid itself, or its member with the largest L1 norm.")(command)
    command = click.option(
        "--allocation", type=click.Choice(settings.ALLOCATIONS), default=settings.ALLOCATIONS[0], show_default=True,
        help="uniform: the same ratio in every layer. Method first, global: per-layer k from one parameter "
             "budget by relative clustering error. Method second, latency: per-stage widths at uniform's "
             "multiply-adds that cost this CPU least once padded to its channel block.")(command)
    return click.option(
        "--features", type=click.Choice(settings.FEATURES), default=settings.FEATURES[0], show_default=True,
        help="Method first: raw filters; bn-weighted: error weighted by the BatchNorm scale; scaled: cluster "
             "filter directions and fold each filter's scale into its BatchNorm.")(command)


class CodebookSize(click.ParamType):
    """A whole number of entries or a fraction of the kernels; FirstConfig checks the range."""
    name = "N|FRACTION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        self.fail(f"{value!r} is neither a number of entries (256) nor a fraction of the kernels (0.25)", param, ctx)


CODEBOOK_SIZE = CodebookSize()


def kernel_options(command):
    """Method first at kernel granularity (toolchain.methods.kernels): export only, for now."""
    command = click.option(
        "--codebook-scope", type=click.Choice(settings.CODEBOOK_SCOPES),
        help=f"Method first, --granularity kernel: the convs sharing one codebook: each conv alone, a stage's "
             f"(the stem with stage 1) or all.  [default: {settings.CODEBOOK_SCOPES[0]}]")(command)
    command = click.option(
        "--reassign/--fixed-index", default=None,
        help="Method first, --granularity kernel: while fine-tuning, each kernel moves to the codebook entry "
             "nearest its trained shadow weights; --fixed-index keeps the entry the refit gave it.  "
             "[default: --reassign]")(command)
    command = click.option(
        "--residual/--no-residual", default=None,
        help="Method first, --granularity kernel: a second codebook of as many entries in each scope, fit to what "
             "the first leaves over; each kernel is the sum of an entry of each (two indices a kernel, the same "
             "bytes as one codebook of twice the entries, far more kernels it can give).  [default: --no-residual]")(command)
    command = click.option(
        "--residual-codebooks", type=click.IntRange(1, settings.MAX_RESIDUAL_CODEBOOKS),
        help="Method first, --residual: how many residual codebooks, each of as many entries, fit to what those "
             "before leave over (one more index a kernel each; given alone it turns --residual on).  [default: 1]")(command)
    command = click.option(
        "--codebook-size", type=CODEBOOK_SIZE,
        help=f"Method first, --granularity kernel: entries per codebook (a uint8 index per kernel up to 256, int16 "
             f"up to {settings.MAX_CODEBOOK}), or a fraction between 0 and 1 of each codebook's kernels (0.25: a "
             f"conv of 4,096 kernels gets 1,024 entries, one of 256 gets 64).  [default: {settings.CODEBOOK_SIZE}]")(command)
    return click.option(
        "--granularity", type=click.Choice(settings.GRANULARITIES), default=settings.GRANULARITIES[0],
        show_default=True,
        help="Method first: filter: each conv's filters share centroid filters (--ratio sets how many); kernel: "
             "every 3x3 kernel is an entry of a codebook (--codebook-size, --codebook-scope; --ratio plays no part).")(command)


def _method_configs(methods, **options) -> dict:
    """Each method's own config from the compression options, those it has fields for."""
    return {m: registry.get(m).config(**options) for m in methods}


def _method_help(names: list[str]) -> str:
    return "; ".join(f"{name}: {registry.get(name).summary}" for name in names) + "."


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Compress CIFAR ResNets by K-Means clustering of convolution filters, export them to ONNX
    and evaluate them under ONNX Runtime."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--arch", default=settings.ARCH, show_default=True, help="resnet20|resnet32|resnet44|resnet56|resnet110")
@click.option("--data", type=click.Path(file_okay=False), help=DATA_HELP)
@click.option("--epochs", type=click.IntRange(1), default=settings.TRAIN_EPOCHS, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Checkpoint written after every epoch; default: artifacts/<arch>_cifar10.pt.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint at --out.")
@click.option("--force", is_flag=True, help="Replace an existing --out instead of refusing.")
@click.option("--init", type=click.Path(dir_okay=False), help="Start from this checkpoint's weights (new schedule).")
@click.option("--seed", type=int, default=settings.SEED, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=settings.TRAIN_LR, show_default=True,
              help="Peak learning rate.")
@click.option("--batch-size", type=click.IntRange(1), default=settings.TRAIN_BATCH_SIZE, show_default=True)
@click.option("--schedule", type=click.Choice(settings.SCHEDULES), default=settings.SCHEDULES[0], show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=settings.WEIGHT_DECAY, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Train on a seeded random subset of N training images.")
@click.option("--test-limit", type=click.IntRange(1), help="Report test accuracy on a subset of N test images.")
@click.option("--download", is_flag=True, help="Fetch the original CIFAR-10 with torchvision first.")
def train(arch, data, epochs, out, resume, force, init, seed, lr, batch_size, schedule, weight_decay, limit, test_limit,
          download):
    """Train a CIFAR ResNet from scratch (SGD, Nesterov, crop+flip), a checkpoint per epoch."""
    from .data import load_split
    from .distributed import torchrun_world
    from .models import parse_arch
    from .training import TrainConfig, train_checkpoint

    parse_arch(arch)
    out = out or f"artifacts/{arch.lower()}_cifar10.pt"
    if download:
        if data is None:
            raise ToolchainError("--download needs --data DIR: the folder to download CIFAR-10 into")
        load_split(data, "test", download=True)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, seed=seed)
    command = "toolchain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with torchrun_world() as world:  # one process, or one of N under torchrun
        try:
            history = train_checkpoint(arch, data, out, cfg, resume=resume, force=force, init=init,
                                       command=command, limit=limit, test_limit=test_limit, log=click.echo,
                                       rank=world.rank, world_size=world.size)
        except KeyboardInterrupt:
            click.echo(f"interrupted: the last finished epoch is saved in {out}; "
                       "run the same command with --resume to continue", err=True)
            sys.exit(130)
    if history and world.rank == 0:
        click.echo(f"done: test accuracy {history[-1].test_accuracy:.4f}, checkpoint {out}")


def teacher_options(has_no_distill: bool):
    """--distill-features and --distill-temperature of export and sweep. None by default: ExportConfig
    resolves them, on with a teacher and off with --no-distill, so a value given with it is refused."""
    off = ", none with --no-distill" if has_no_distill else ""

    def add(command):
        command = click.option(
            "--distill-temperature", type=click.FloatRange(min=0, min_open=True),
            show_default=f"{settings.DISTILL_TEMPERATURE:g}{off}",
            help="Softmax temperature of the logit distillation.")(command)
        return click.option(
            "--distill-features", type=click.FloatRange(min=0), show_default=f"{settings.DISTILL_FEATURES:g}{off}",
            help="Weight of the residual blocks' outputs matched to the original model's during the fine-tune, "
                 "beside the logits (0: the logits alone).")(command)
    return add


@cli.command()
@click.option("--method", type=click.Choice(registry.names(registry.MODEL, registry.BASELINE)),
              default=registry.METHODS[0].name, show_default=True,
              help=_method_help(registry.names(registry.MODEL, registry.BASELINE)))
@click.option("--ratio", type=Ratio(), default=settings.RATIO, show_default=True,
              help="Fraction of filters removed from each clustered layer (0.5 keeps half).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Source checkpoint; default: the shipped baseline.")
@click.option("--arch", help="Architecture, where the checkpoint does not record it (resnet20, resnet32, ...).")
@click.option("--data", type=click.Path(file_okay=False), help=DATA_HELP + " (fine-tuning and checks use it)")
@click.option("--finetune-epochs", type=click.IntRange(0), default=settings.FINETUNE_EPOCHS, show_default=True,
              help="Fine-tuning epochs when data is available (0 to skip).")
@click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=settings.FINETUNE_LR,
              show_default=True, help="Peak learning rate of the one-cycle fine-tune.")
@click.option("--no-distill", is_flag=True, help="Fine-tune on labels only, without the original model as teacher.")
@teacher_options(has_no_distill=True)
@click.option("--centroid-bits", type=click.Choice([str(b) for b in settings.CENTROID_BITS]),
              help="Method first: store centroids as int8, or as 4-bit codes packed two to a byte "
                   "(fine-tuned with the rounding in the loop).")
@kernel_options
@compression_options
@click.option("--round-to", type=click.IntRange(1),
              help=f"Method {' and '.join(registry.taking('round_to'))}: round kept widths up to a multiple of N "
                   "(default: this CPU's channel block).")
@click.option("--quantize", type=click.Choice(settings.QUANTIZE),
              help="Write ONNX Runtime's static int8 (QDQ) file, calibrated on training images (needs data); with "
                   "fine-tuning, the fine-tune simulates the int8 rounding (quantization-aware).")
@click.option("--seed", type=int, default=settings.SEED, show_default=True)
@click.option("--train-limit", type=click.IntRange(1), help="Fine-tune on a subset of N training images.")
@click.option("--test-limit", type=click.IntRange(1), help="Measure accuracy on a subset of N test images.")
@click.option("--out", type=click.Path(dir_okay=False), help="ONNX file to write; default: artifacts/<arch>_<method>_r<ratio>.onnx")
@click.option("--stage-accuracy", is_flag=True,
              help="Also measure accuracy right after compression, before the refit (one more pass over the test "
                   "images; the sweep always does).")
@click.option("--json", "json_out", help="Write the manifest as JSON to PATH ('-' for stdout).")
def export(method, ratio, checkpoint, arch, data, finetune_epochs, finetune_lr, no_distill, distill_features,
           distill_temperature, centroid_bits,
           features, allocation, keep, no_reconstruct, granularity, codebook_size, codebook_scope, reassign, residual,
           residual_codebooks, round_to, quantize, seed, train_limit, test_limit, out, stage_accuracy, json_out):
    """Compress a checkpoint, export it to ONNX, check ONNX Runtime against PyTorch, write a manifest."""
    from .distributed import torchrun_world
    from .pipeline import ExportConfig, run_export

    _refuse_options_of_other_methods(method)

    options = _method_configs([method], features=features, allocation=allocation, keep=keep, granularity=granularity,
                              codebook_size=codebook_size, codebook_scope=codebook_scope, reassign=reassign,
                              residual=residual, residual_codebooks=residual_codebooks)[method]
    cfg = ExportConfig(method=method, ratio=ratio, checkpoint=checkpoint, arch=arch, data=data,
                       finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, distill=not no_distill,
                       distill_features=distill_features, distill_temperature=distill_temperature,
                       centroid_bits=int(centroid_bits) if centroid_bits else None, round_to=round_to, quantize=quantize,
                       seed=seed, train_limit=train_limit, test_limit=test_limit, out=out,
                       reconstruct=not no_reconstruct, stage_accuracy=stage_accuracy, options=options)
    if cfg.label and _given("ratio"):
        raise ToolchainError(f"--ratio plays no part in {method} {cfg.label} (its options set its size): leave it out")
    with torchrun_world() as world:  # one process, or one of N fine-tuning under torchrun
        result = run_export(cfg, log=lambda line: click.echo(line, err=json_out == "-"),
                            rank=world.rank, world_size=world.size)
    if result is not None:
        emit_json(json_out, result.manifest)


def _given(name: str) -> bool:
    """Whether the user typed this option (not its default)."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) is ParameterSource.COMMANDLINE


def _refuse_options_of_other_methods(method: str) -> None:
    """Options that only some methods take (registry.Method.options): given to another, they would be
    silently ignored."""
    for name in registry.method_specific_options():
        takers = registry.taking(name)
        if method not in takers and _given(name):
            raise ToolchainError(f"{_flags(name)} is an option of method {' and '.join(takers)}, not of {method}")


def _flags(name: str) -> str:
    """The option as the user may type it: both halves of an on/off pair (--reassign/--fixed-index)."""
    param = next(p for p in click.get_current_context().command.params if p.name == name)
    return "/".join(param.opts + param.secondary_opts)


@cli.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(file_okay=False), help=DATA_HELP)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (.onnx models).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Evaluate a seeded random subset of N test images.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime (default: all cores).")
@click.option("--arch", help="Architecture of a checkpoint that does not record it.")
@click.option("--json", "json_out", help="Write results as JSON to PATH ('-' for stdout).")
def eval_cmd(model, data, provider, batch_size, limit, threads, arch, json_out):
    """Top-1 accuracy of an .onnx file (ONNX Runtime) or a .pt checkpoint (PyTorch) on the test split."""
    from eval.accuracy import evaluate_model

    from .data import load_split

    from pathlib import Path

    if not Path(model).is_file():
        raise ToolchainError(f"model {model} does not exist")
    split = load_split(data, "test").subset(limit)
    row = evaluate_model(model, split, provider=provider, batch_size=batch_size, threads=threads, arch=arch)
    if json_out != "-":
        click.echo(f"{row['model']}: accuracy {row['accuracy']:.4f} on {row['images']} images "
                   f"({row['provider']}, {row['seconds']:.2f}s); {row['model_bytes']:,} bytes "
                   f"({row['gzip_bytes']:,} gzipped), {row['params']:,} params, {row['macs'] / 1e6:.2f}M MACs")
    emit_json(json_out, row)


def _ratio_list(value: str) -> tuple[float, ...]:
    ratio = Ratio()
    return tuple(ratio.convert(v.strip(), None, None) for v in value.split(","))


@cli.command()
@click.option("--method", "methods", type=click.Choice(registry.names(registry.MODEL)), multiple=True,
              default=[registry.METHODS[0].name], show_default=True,
              help="Method to sweep; repeat to sweep several into one report. first is exported with float and "
                   "int8 centroids beside its peer, ONNX Runtime's int8 quantization of the baseline. "
                   + _method_help(registry.names(registry.MODEL)))
@click.option("--ratios", default=",".join(map(str, settings.SWEEP_RATIOS)), show_default=True,
              help="Comma-separated ratios.")
@click.option("--data", type=click.Path(file_okay=False), help=DATA_HELP)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Source checkpoint; default: the shipped baseline.")
@click.option("--arch", help="Architecture, where the checkpoint does not record it.")
@click.option("--finetune-epochs", type=click.IntRange(0), default=settings.FINETUNE_EPOCHS, show_default=True)
@click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=settings.FINETUNE_LR,
              show_default=True, help="Peak learning rate of the one-cycle fine-tune.")
@click.option("--round-to", type=click.IntRange(1), help="Methods second and l1: channel multiple of kept widths.")
@teacher_options(has_no_distill=False)
@compression_options
@click.option("--train-limit", type=click.IntRange(1), help="Fine-tune on a subset of N training images.")
@click.option("--test-limit", type=click.IntRange(1), help="Measure accuracy on a subset of N test images.")
@click.option("--codebooks", metavar="SCOPE:SIZE[xN],...",
              help="Method first: also sweep kernel codebooks, each one model of its size (no ratio), e.g. "
                   f"layer:256,stage:256,layer:0.25,layer:256x2 (a fraction: of each codebook's kernels; xN: N "
                   f"codebooks a kernel draws from, the first and N - 1 residual ones); scopes: "
                   f"{', '.join(settings.CODEBOOK_SCOPES)}.")
@click.option("--centroid-bits", "extra_bits", type=click.Choice([str(settings.TRAINED_BITS)]), multiple=True,
              help="Method first: also export 4-bit centroids (one more fine-tune per ratio, with the rounding "
                   "in the loop).")
@click.option("--quantize", type=click.Choice(settings.QUANTIZE), multiple=True,
              help="Also export every model, the baseline too, as ONNX Runtime's static int8 (QDQ), each with a "
                   "quantization-aware fine-tune of its own.")
@click.option("--repeats", type=click.IntRange(1), default=settings.SWEEP_REPEATS, show_default=True,
              help="Latency repeats.")
@click.option("--out", type=click.Path(file_okay=False), default=settings.SWEEP_OUT, show_default=True)
def sweep(methods, ratios, data, checkpoint, arch, finetune_epochs, finetune_lr, round_to, distill_features,
          distill_temperature, features, allocation, keep, no_reconstruct, train_limit, test_limit, codebooks,
          extra_bits, quantize, repeats, out):
    """The whole pipeline over several ratios against the baseline: report.md, results.json/.csv, plots.

    Resumable: finished ratios recorded in OUT/results.json are not redone."""
    from .pipeline import ExportConfig
    from .sweep import SweepConfig, run_sweep

    try:
        ratio_values = _ratio_list(ratios)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="'--ratios'")
    # The settings all rows share; each row sets its own method and ratio (and is validated then).
    export_cfg = ExportConfig(method=registry.baseline().name, checkpoint=checkpoint, arch=arch, data=data,
                              finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                              distill_features=distill_features, distill_temperature=distill_temperature,
                              round_to=round_to, train_limit=train_limit, test_limit=test_limit,
                              reconstruct=not no_reconstruct)
    methods = tuple(dict.fromkeys(methods))
    options = _method_configs(methods, features=features, allocation=allocation, keep=keep)
    sized = tuple((m, registry.get(m).config(features=features, granularity="kernel", codebook_scope=scope,
                                             codebook_size=size, residual_codebooks=(count - 1) or None))
                  for scope, size, count in _codebook_list(codebooks) for m in registry.taking("codebook_size"))
    try:
        run_sweep(SweepConfig(methods=methods, ratios=ratio_values, out=out, export=export_cfg, options=options, sized=sized,
                              repeats=repeats, trained_bits=tuple(int(b) for b in extra_bits), quantize=quantize),
                  log=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished ratios are kept in {out}/results.json; "
                   "run the same command again to continue", err=True)
        sys.exit(130)
    click.echo(f"report: {out}/report.md")


def _codebook_list(value: str | None) -> list[tuple[str, int | float, int]]:
    """--codebooks layer:256,layer:0.25,stage:256x3 -> [("layer", 256, 1), ("layer", 0.25, 1), ("stage", 256, 3)]:
    scope, size, and how many codebooks a kernel draws from (the first and its residual ones)."""
    specs = []
    for spec in (value.split(",") if value else []):
        scope, _, size = spec.strip().partition(":")
        size, times, count = size.partition("x")
        try:
            count = int(count) if times else 1
            if not 1 <= count <= 1 + settings.MAX_RESIDUAL_CODEBOOKS:
                raise ValueError
            specs.append((scope.strip(), CODEBOOK_SIZE.convert(size.strip(), None, None), count))
        except (click.BadParameter, ValueError):
            raise click.BadParameter(f"{spec.strip()!r} is not SCOPE:SIZE[xN] (N from 1 to "
                                     f"{1 + settings.MAX_RESIDUAL_CODEBOOKS}), e.g. layer:256, layer:0.25 or layer:256x2",
                                     param_hint="'--codebooks'") from None
    return specs


def _int_list(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,32,256")
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be 1 or more")
    return sizes


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-sizes", default=",".join(map(str, settings.BENCH_BATCH_SIZES)), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads per session (default: all cores).")
@click.option("--warmup", type=click.IntRange(0), default=settings.BENCH_WARMUP, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=settings.BENCH_REPEATS, show_default=True)
@click.option("--json", "json_out", help="Write rows as JSON to PATH ('-' for stdout).")
def bench(models, provider, batch_sizes, threads, warmup, repeats, json_out):
    """Latency of ONNX models, interleaved in one run (each timed run after 10 ms of untimed runs of the same
    model, where there are several); speed-up against the first model given."""
    from eval.bench import BenchConfig, bench as run_bench

    cfg = BenchConfig(batch_sizes=_int_list(batch_sizes), provider=provider, threads=threads,
                      warmup=warmup, repeats=repeats)
    rows = run_bench(list(models), cfg, progress=lambda b: click.echo(f"batch {b} done", err=True))
    if json_out != "-":
        isa = ", ".join(k for k, on in rows[0]["instruction_sets"].items() if on) or "none of avx2, avx512, vnni"
        click.echo(f"CPU: {rows[0]['cpu']} ({isa}), {provider}")
        click.echo(f"{'model':<44} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                   f"{'img/s':>9} {'speedup':>7}")
        for r in rows:
            click.echo(f"{r['model'][-44:]:<44} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                       f"{r['p99_ms']:>9.3f} {r['images_per_s']:>9.0f} {r['speedup']:>7.3f}")
    emit_json(json_out, rows)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(file_okay=False), help=DATA_HELP + " (calibration images from its training split)")
@click.option("--out", type=click.Path(dir_okay=False), help="int8 file to write; default: MODEL with _int8 before .onnx.")
@click.option("--calibration-images", type=click.IntRange(1), default=settings.INT8_CALIBRATION_IMAGES,
              show_default=True, help="Training images the activation ranges are taken over.")
@click.option("--seed", type=int, default=settings.SEED, show_default=True, help="Which calibration images.")
@click.option("--json", "json_out", help="Write the manifest as JSON to PATH ('-' for stdout).")
def quantize(model, data, out, calibration_images, seed, json_out):
    """Post-training static int8 (ONNX Runtime QDQ: int8 weights per channel, uint8 activations) of a float
    ONNX file, calibrated on training images; for models without a PyTorch checkpoint."""
    from pathlib import Path

    from eval.runtime import load_onnx
    from export.int8_static import calibration_images as calibration, quantize_int8

    from .data import load_split

    proto = load_onnx(model)  # a missing, invalid or foreign file fails here
    out = out or str(Path(model).with_name(Path(model).stem + "_int8.onnx"))
    images = calibration(proto, load_split(data, "train"), calibration_images, seed)
    manifest = quantize_int8(model, out, images)
    if json_out != "-":
        click.echo(f"wrote {out} ({manifest['model_bytes']:,} bytes, calibrated on {len(images)} images)")
    emit_json(json_out, manifest)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--max-bytes", help="Largest file size: 300KB, 1.5MB or plain bytes.")
@click.option("--max-params", type=click.IntRange(0), help="Most stored parameters.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Slowest median latency at batch 1 on the CPU.")
@click.option("--json", "json_out", help="Write the checks as JSON to PATH ('-' for stdout).")
def check(model, max_bytes, max_params, max_latency_ms, json_out):
    """Edge-deployment checks: a valid file that ONNX Runtime loads, within the given limits.

    Exit status 0 when every limit holds, 1 naming the failing figure."""
    from eval.checks import check_model, parse_size

    try:
        limit_bytes = parse_size(max_bytes) if max_bytes is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--max-bytes'")
    rows = check_model(model, limit_bytes, max_params, max_latency_ms)
    if json_out != "-":
        for r in rows:
            limit = "" if r["limit"] is None else f" (limit {r['limit']})"
            click.echo(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}: {r['value']}{limit}")
    emit_json(json_out, rows)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        click.echo("error: " + "; ".join(f"{r['check']} {r['value']} exceeds {r['limit']}" for r in failed),
                   err=True)
        sys.exit(1)


def emit_json(target: str | None, data) -> None:
    """--json PATH writes atomically; '-' prints to stdout."""
    if target is None:
        return
    if target == "-":
        click.echo(json.dumps(data, indent=2))
    else:
        from .io import write_json
        write_json(target, data)


def main(argv=None):
    """Entry point: one clear line and exit status 2 for any error a user can cause."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="toolchain")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except ToolchainError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
