"""Defaults and choices of the user-facing settings, each written once.

The configs (ExportConfig, TrainConfig, the methods' configs) and the CLI's options and help all
read them from here. The module imports nothing, so `toolchain --help` starts without torch.
"""

SEED = 0
RATIO = 0.5  # the original work's ratio: the fraction of filters removed from each clustered layer

# Training from scratch (toolchain train).
ARCH = "resnet20"
TRAIN_EPOCHS = 50
TRAIN_BATCH_SIZE = 128
TRAIN_LR = 0.1  # peak learning rate
WEIGHT_DECAY = 5e-4
SCHEDULES = ("onecycle", "cosine")  # the default first

FINETUNE_EPOCHS = 3
FINETUNE_LR = 0.01  # peak of the one-cycle schedule
CALIBRATION_IMAGES = 1024  # training images the least-squares refit is fit on

# The teacher (the uncompressed model) during fine-tuning.
DISTILL_TEMPERATURE = 4.0  # softmax temperature of the logit distillation
DISTILL_FEATURES = 1.0  # weight of the residual blocks' outputs matched to the teacher's

# Method first.
FEATURES = ("scaled", "bn-weighted", "raw")  # the default first
CENTROID_BITS = (4, 8)
TRAINED_BITS = 4  # centroids this narrow are fine-tuned with their rounding in the loop
FIRST_ALLOCATIONS = ("uniform", "global")
GRANULARITIES = ("filter", "kernel")  # what a centroid is: a whole filter, or one kh x kw kernel
CODEBOOK_SIZE = 256  # kernel granularity: entries per codebook (a uint8 index per kernel up to 256),
# or a fraction between 0 and 1: that share of each codebook's kernels
MAX_CODEBOOK = 32767  # int16 indices beyond 256 entries
MAX_RESIDUAL_CODEBOOKS = 7  # 8 uint8 indices a kernel at most: nearly the 9 bytes of its int8 weights
CODEBOOK_SCOPES = ("layer", "stage", "network")  # the convs sharing one codebook; the default first
WEIGHT_CLUSTERS = 16  # the weight-clustering peer's values per conv (TFMOT's usual choice: a 4-bit index)

# Methods second and l1.
KEEP = ("salient", "medoid", "centroid", "largest")  # the default first
SECOND_ALLOCATIONS = ("uniform", "latency")
ALLOCATIONS = tuple(dict.fromkeys(FIRST_ALLOCATIONS + SECOND_ALLOCATIONS))  # every method's, for the shared CLI option
UNIFORM = ALLOCATIONS[0]  # the same ratio in every layer

# Sweeps and benchmarks.
SWEEP_RATIOS = (0.25, 0.5, 0.75, 0.9)
SWEEP_OUT = "artifacts/report"
SWEEP_BATCH_SIZES = (1, 256)
SWEEP_REPEATS = 20
BENCH_BATCH_SIZES = (1, 32, 256)
BENCH_WARMUP = 5
BENCH_REPEATS = 30

# Static int8 deployment (ONNX Runtime QDQ).
QUANTIZE = ("int8",)
INT8_CALIBRATION_IMAGES = 512  # training images the activation ranges are taken over
