"""Defaults and choices of the user-facing settings, each written once.

The configs (ExportConfig, TrainConfig, the methods' configs) and the CLI's options and help all
read them from here. The module imports nothing, so `toolchain --help` starts without torch.
"""

RATIO = 0.5  # the original work's ratio: the fraction of filters removed from each clustered layer
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

# Methods second and l1.
KEEP = ("salient", "medoid", "centroid", "largest")  # the default first
SECOND_ALLOCATIONS = ("uniform", "latency")
ALLOCATIONS = ("uniform", "global", "latency")  # every method's, for the shared CLI option
