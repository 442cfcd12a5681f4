"""fl_plugins: federated self-supervised learning for medical imaging on NVIDIA FLARE.

Layers, lowest first; a module imports only its own layer and those below it (checked by
``tests/test_layers.py`` with ``tests/layer_contract.py``):

0. base modules: ``fl_plugins.wire`` (wire constants), ``fl_plugins.cpu_threads``, ``fl_plugins.settings``,
   ``fl_plugins.atomic_io`` — standard library only, no ``fl_plugins`` import
1. ``fl_plugins.core``     pure-torch method cores (losses, heads, masking, EMA, schedules)
2. ``fl_plugins.data``     one data layer: Decathlon/NIfTI, MedMNIST, synthetic phantoms, site splits, views
3. ``fl_plugins.models``   backbones (timm ViT, MONAI U-Net), segmentation/classification models
4. ``fl_plugins.engine``   generic framework-free loops: fine-tuning, SSL steps, metrics, k-NN, checkpoints
5. ``fl_plugins.methods``  named methods assembled from core + models + engine (DINO / DINOv2)
6. ``fl_plugins.flare``    thin NVIDIA FLARE adapters (executors, persistors, job builders)
7. ``fl_plugins.cli``      the ``flssl`` command

Only ``flare`` and ``cli`` import ``nvflare``; nothing but them imports ``fl_plugins.flare``; no module below
``flare`` imports ``torch.distributed``.
"""

__version__ = "0.1.0"
