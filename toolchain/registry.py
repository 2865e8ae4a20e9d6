"""The one registry of compression methods and of the peers they are measured against.

Each `Method` is all the toolchain needs to know about a method: its name (on the command line
and in result rows), the command-line options it takes, the peer a user would pick instead and
how the report compares the two, and the module that implements it. That module is imported on
first use, so the CLI builds its choices and help without importing torch.

Adding a method: write `toolchain/methods/<name>.py` with a config dataclass, an apply function
and an `IMPLEMENTATION` (toolchain.methods.Implementation), then add one `Method` below. The
CLI, the pipeline, the sweep and the report take it from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import ToolchainError

# What a method is: the uncompressed model, a compression of the PyTorch model (fine-tuned like
# the others), or a transformation of the baseline's ONNX file (no training).
BASELINE, MODEL, FILE = "baseline", "model", "file"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help
    kind: str = MODEL
    module: str | None = None  # defines IMPLEMENTATION; None for the baseline
    # Command-line options that only the methods listing them take (given to another, refused).
    options: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()  # the methods a user would pick instead of this one
    # How the report compares this method with its peers: "epochs" (the same widths, accuracy after
    # each fine-tuning budget) or "size" (accuracy against file bytes).
    compare: str | None = None
    title: str | None = None  # in report headings, e.g. "L1-norm pruning"
    label: str | None = None  # in tables and plots; default: the name
    short: str | None = None  # a peer's, in the report's comparison tables; default: the label
    storage: str = "weights"  # what its narrower storage rounds, in the report's words
    peer_plot: str | None = None  # the report's plot of this method against its peer; default peer_<name>.png
    report_note: str = ""  # a peer's: how it is made, for the report's comparison section

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def short_name(self) -> str:
        return self.short or self.display

    @property
    def peer_plot_file(self) -> str:
        return self.peer_plot or f"peer_{self.name}.png"

    @property
    def is_baseline(self) -> bool:
        return self.kind == BASELINE

    def implementation(self):
        """The method's toolchain.methods.Implementation (None for the baseline)."""
        return importlib.import_module(self.module).IMPLEMENTATION if self.module else None

    def config(self, **options):
        """The method's config from the options it has fields for (the CLI passes them all); None
        for the baseline and file-level peers."""
        from dataclasses import fields

        impl = self.implementation()
        if impl is None or impl.config is None:
            return None
        names = {f.name for f in fields(impl.config)}
        return impl.config(**{k: v for k, v in options.items() if k in names and v is not None})


METHODS = (
    Method("first", "shared centroid filters: every conv's filters replaced by their clusters' centroids",
           module="toolchain.methods.first",
           options=("centroid_bits", "features", "no_reconstruct", "granularity", "codebook_size", "codebook_scope",
                    "reassign", "residual", "residual_codebooks"),
           peers=("int8-dynamic", "weight-clustering"), compare="size", storage="centroids", peer_plot="peer_size.png"),
    Method("second", "smaller residual blocks: each block's first conv keeps one filter per cluster",
           module="toolchain.methods.second", options=("keep", "round_to", "no_reconstruct"),
           peers=("l1",), compare="epochs", peer_plot="peer_structural.png"),
    Method("l1", "the peer of second: Torch-Pruning L1-norm pruning to second's widths (peers extra)",
           module="toolchain.methods.l1_peer", options=("round_to",), title="L1-norm pruning", short="L1",
           report_note="The L1 peer (`--method l1`) prunes the same block-conv1 channels to the same widths with "
                       "Torch-Pruning (smallest filter L1 norms go), then gets the same BN recalibration and the very "
                       "same fine-tuning (schedule, epochs, learning rate, distillation)."),
    Method("weight-clustering", "the peer of first's kernel codebooks: TensorFlow Model Optimization's weight "
           "clustering, each conv's weights 16 values, a 4-bit index per weight",
           module="toolchain.methods.weight_clustering", title="weight clustering", short="clustering",
           report_note="The weight-clustering peer (`--method weight-clustering`) clusters each conv's weights into 16 "
                       "values as TensorFlow Model Optimization does (shadow weights fine-tuned straight through, "
                       "each weight re-assigned to its nearest value at every step, values' gradients averaged), "
                       "stores a 4-bit index per "
                       "weight, and gets the same BN recalibration and the very same fine-tuning."),
    Method("int8-dynamic", "a peer of first: ONNX Runtime's int8 weight quantization of the baseline file",
           kind=FILE, module="export.int8_peer", title="int8 weight quantization", short="int8",
           report_note="The size peer is ONNX Runtime's `quantize_dynamic` (int8 weights, activations quantized at "
                       "run time, no fine-tuning) on the baseline ONNX file."),
    Method("none", "the model as it is (the baseline)", kind=BASELINE, label="baseline"),
)
_BY_NAME = {m.name: m for m in METHODS}


def get(name: str) -> Method:
    """The registered method of this name: the one place a method is looked up by its name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ToolchainError(f"unknown method {name!r}; choose one of {', '.join(_BY_NAME)}") from None


def names(*kinds: str) -> list[str]:
    """Names of the methods of these kinds, in registry order."""
    return [m.name for m in METHODS if m.kind in kinds]


def baseline() -> Method:
    return next(m for m in METHODS if m.is_baseline)


def taking(option: str) -> list[str]:
    """Names of the methods that take a method-specific command-line option."""
    return [m.name for m in METHODS if option in m.options]


def method_specific_options() -> list[str]:
    return list(dict.fromkeys(o for m in METHODS for o in m.options))
