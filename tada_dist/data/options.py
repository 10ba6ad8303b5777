"""The data settings' accepted values, importable without torch, DALI or PIL (configs validate against them)."""

LOADER_BACKENDS = ("dali", "torch")  # DALI pipelines, or torchvision transforms in a DataLoader
DEVICES = ("cpu", "gpu")  # where the loaders decode
RESIZE_MODES = ("shorter", "square")
TRAIN_CROPS = ("random", "random_resized")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
