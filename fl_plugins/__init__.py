"""fl_plugins: federated self-supervised learning for medical imaging on NVIDIA FLARE.

Layers (import rule: only ``fl_plugins.flare`` may import ``nvflare``):

- ``fl_plugins.core``    pure-torch method cores (losses, heads, masking, EMA, schedules)
- ``fl_plugins.data``    one data layer: Decathlon/NIfTI, MedMNIST, synthetic phantoms, site splits
- ``fl_plugins.models``  backbones (timm ViT, MONAI U-Net), segmentation/classification models
- ``fl_plugins.engine``  framework-free local training / evaluation / checkpoints
- ``fl_plugins.flare``   thin NVIDIA FLARE adapters (executors, persistors, job builders)
"""

__version__ = "0.1.0"
