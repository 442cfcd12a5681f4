"""The masked-image-modelling preview of SSLHandler: one ``ssl/preview`` image per round (rows input / masked input /
reconstruction of fixed validation images), in [0, 1], with the same masks every round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.handler import SiteContext
from fl_plugins.flare.ssl_handler import SSLHandler, preview_grid

TINY = {"unet": {"channels": [4, 8], "strides": [2]}, "image_size": 32, "patch_size": 8, "batch_size": 4}
PAD = 2


def _handler(datalist, tmp_path, images: list, **kwargs) -> SSLHandler:
    site = SiteContext("site-1", str(datalist), str(tmp_path),
                       log_image=lambda tag, image, step: images.append((tag, image, step)))
    return SSLHandler(site, "unet_inpaint", dict(TINY), steps_per_round=1, total_rounds=3, knn_every=0,
                      spatial_dims=2, **kwargs)


def _run(h: SSLHandler, rounds: int) -> None:
    params = h.federated_params()
    for r in range(rounds):
        params = h.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=r, total_rounds=rounds)).params


def _rows(image: np.ndarray, size: int = 32) -> list[np.ndarray]:
    return [image[:, i * (size + PAD):i * (size + PAD) + size] for i in range(3)]


def test_one_preview_per_round_fixed_masks(synth_seg_data, tmp_path):
    images: list = []
    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, images)
    assert h.preview_images.shape == (4, 1, 32, 32)
    _run(h, 3)
    assert [(tag, step) for tag, _, step in images] == [("ssl/preview", 0), ("ssl/preview", 1), ("ssl/preview", 2)]
    for _, im, _ in images:
        assert im.shape == (1, 3 * 32 + 2 * PAD, 4 * 32 + 3 * PAD) and im.dtype == np.float32
        assert im.min() >= 0.0 and im.max() <= 1.0
        for row in _rows(im):  # each row min-max scaled on its own
            assert row.min() == pytest.approx(0.0) and row.max() == pytest.approx(1.0)
    first, later = _rows(images[0][1]), _rows(images[2][1])
    np.testing.assert_array_equal(first[0], later[0])  # the same images
    np.testing.assert_array_equal(first[1], later[1])  # the same masked input every round
    assert not np.array_equal(first[2], later[2])  # the model trained: another reconstruction
    xin, pix = h.method.mask_images(h.preview_images, torch.Generator().manual_seed(h.seed))  # the site seed's masks
    assert float(pix.mean()) == 0.75  # mask_ratio: 12 of the 16 patches of each image
    np.testing.assert_allclose(first[1], _rows(preview_grid([xin, xin, xin]))[1], atol=1e-6)


def test_preview_every_and_off(synth_seg_data, tmp_path):
    images: list = []
    _run(_handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, images, preview_every=2), 3)
    assert [step for _, _, step in images] == [0, 2]
    images.clear()
    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, images, preview_every=0)
    _run(h, 1)
    assert images == [] and h.preview_images is None
    with pytest.raises(ValueError, match="preview_every must be >= 0"):
        _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, images, preview_every=-1)


def test_preview_grid_volumes_channels_and_constant_rows():
    vol = torch.zeros(2, 1, 5, 8, 8)
    vol[:, :, 2] = torch.arange(64.0).reshape(8, 8)  # only the middle slice varies
    g = preview_grid([vol, torch.ones(2, 1, 8, 8), torch.rand(2, 4, 8, 8)], pad=1)
    assert g.shape == (1, 3 * 8 + 2, 2 * 8 + 1)
    np.testing.assert_allclose(g[0, :8, :8], np.arange(64.0).reshape(8, 8) / 63, rtol=1e-6)
    assert (g[0, 9:17, :8] == 0).all()  # a constant row shows as 0
    assert preview_grid([torch.rand(3, 3, 4, 4)]).shape == (3, 4, 3 * 4 + 2 * 2)


def test_mae_3d_preview_shows_the_middle_slice_of_fixed_volumes(tmp_path):
    """MAE on volumes: the preview's tiles are the middle slices of the first validation volumes, masks fixed."""
    import json

    n = 8
    vols = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 16), dtype=np.uint8)
    labels = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(tmp_path / "v.npz", **{f"{s}_images": vols for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    entries = [{"npz": "v.npz", "split": "val", "index": i, "label": int(labels[i, 0])} for i in range(n)]
    dl = {"format": "medmnist", "task": "classification", "num_classes": 2, "modality_preset": "unit",
          "training": [dict(e, split="train") for e in entries], "validation": entries[:2]}
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    images: list = []
    site = SiteContext("site-1", str(tmp_path / "datalist.json"), str(tmp_path),
                       log_image=lambda tag, image, step: images.append(image))
    cfg = {"variant": "mae", "spatial_dims": 3, "batch_size": 4,
           "backbone": {"img_size": 16, "patch_size": 4, "depth": 1}, "decoder_depth": 1}
    h = SSLHandler(site, "mae", cfg, steps_per_round=1, knn_every=0, spatial_dims=3)
    assert h.preview_images.shape == (2, 1, 16, 16, 16)  # the 2 validation volumes (fewer than PREVIEW_IMAGES)
    _run(h, 2)
    assert len(images) == 2 and images[0].shape == (1, 3 * 16 + 2 * PAD, 2 * 16 + PAD)
    mids = vols[:2, 8].astype(np.float32) / 255  # the volumes' middle slices; the row is min-max scaled over both
    np.testing.assert_allclose(images[0][0, :16, :16], (mids[0] - mids.min()) / (mids.max() - mids.min()), atol=1e-5)
    np.testing.assert_array_equal(images[0][0, 18:34], images[1][0, 18:34])  # the same masked input each round


def test_client_api_image_record_is_what_the_tb_receiver_writes(tmp_path):
    """The Client API path's ``log_image`` sends nvflare's IMAGE analytics record (TensorBoard syntax); the record,
    as FLARE rebuilds it, is written by the receiver's TensorBoard writer as an image."""
    from types import SimpleNamespace

    from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo
    from nvflare.app_opt.tracking.tb.tb_event_writer import TensorBoardEventWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_plugins.flare.client_api import _image_logger

    calls: list = []
    api = SimpleNamespace(log=lambda key, value, data_type, **kw: calls.append(dict(key=key, value=value,
                                                                                    data_type=data_type, **kw)))
    image = preview_grid([torch.rand(2, 1, 8, 8)] * 3)
    _image_logger(SimpleNamespace(ctx=SimpleNamespace(api=api)))("ssl/preview", image, 3)
    (msg,) = calls
    assert msg["data_type"] == AnalyticsDataType.IMAGE and msg["writer"] == LogWriterName.TORCH_TB
    msg["tag"] = msg.pop("key")  # what nvflare's in-process backend does with the message
    record = AnalyticsData.from_dxo(create_analytic_dxo(**msg))
    writer = TensorBoardEventWriter(str(tmp_path))
    writer.add_image(record.tag, record.value, record.step)  # TBAnalyticsReceiver's call for IMAGE records
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (shot,) = acc.Images("ssl/preview")
    assert shot.step == 3 and (shot.height, shot.width) == image.shape[1:]
    assert _image_logger(None)("ssl/preview", image, 0) is None  # no FLARE runtime: a no-op
