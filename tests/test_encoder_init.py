"""``method.encoder_init``: released weights in each official key layout (built here from a timm ViT by renaming its
keys the way the official code names them) start the encoder, and the teacher of EMA methods; bad ones are refused
before Ray starts, naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import boto3
import pytest
import timm
import torch

from methods.checkpoint_io import CheckpointError, CheckpointMismatchError
from methods.pretrained import load_encoder_init, read_checkpoint, to_timm
from methods.registry import build_method
from ssl_platform.launch.preflight import preflight
from ssl_platform.spec import method_kwargs, spec_from_dict
from ssl_platform.storage.method_checkpoints import localize_encoder_init
from tests.conftest import TINY_VIT, tiny_spec_dict

ENC = {**TINY_VIT, "depth": 2}


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(7)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**ENC, **kw})
    with torch.no_grad():  # non-trivial tokens and norms, so a mix-up shows in the outputs
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def _args() -> argparse.Namespace:
    return argparse.Namespace(arch="vit_tiny", patch_size=4, lr=5e-4)


# ---- the official layouts, from a timm ViT -----------------------------------------------------------------
def dino_full(sd: dict) -> dict:
    """facebookresearch/dino main_dino.py: ``student`` is DDP-wrapped (``module.``), ``teacher`` not; both
    ``MultiCropWrapper(backbone, DINOHead)``."""
    head = {"head.mlp.0.weight": torch.zeros(8, 32), "head.last_layer.weight_v": torch.zeros(16, 8)}
    return {"student": {**{f"module.backbone.{k}": v for k, v in sd.items()}, **{f"module.{k}": v for k, v in head.items()}},
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
            "optimizer": {}, "epoch": 100, "args": _args(), "dino_loss": {"center": torch.zeros(1, 16)}}


def ibot_full(sd: dict) -> dict:
    """bytedance/ibot main_ibot.py: as DINO, and the backbone has ``masked_embed`` (its mask token)."""
    out = dino_full(sd)
    out["teacher"]["backbone.masked_embed"] = torch.zeros(1, 32)
    out["student"]["module.backbone.masked_embed"] = torch.zeros(1, 32)
    return out


def ibot_teacher(sd: dict) -> dict:
    """iBOT's released ``checkpoint_teacher.pth``: ``{"state_dict": backbone}``."""
    return {"state_dict": {**sd, "masked_embed": torch.zeros(1, 32)}}


def mae_checkpoint(sd: dict) -> dict:
    """facebookresearch/mae models_mae.py + main_pretrain.py: ``{"model": MaskedAutoencoderViT.state_dict(), ...}``."""
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(48, 16)}
    return {"model": {**sd, **decoder}, "optimizer": {}, "epoch": 799, "scaler": {}, "args": _args()}


def hf_data2vec(sd: dict) -> dict:
    """transformers' Data2VecVisionModel (BEiT-style: separate query / key / value, no key bias, ``lambda_*`` layer
    scale, ``layernorm_before`` / ``layernorm_after``, mean pooling with ``pooler.layernorm``)."""
    out = {"data2vec_vision.embeddings.cls_token": sd["cls_token"],
           "data2vec_vision.embeddings.mask_token": torch.zeros(1, 1, 32),
           "data2vec_vision.embeddings.position_embeddings": sd["pos_embed"],
           "data2vec_vision.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "data2vec_vision.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "data2vec_vision.pooler.layernorm.weight": sd["fc_norm.weight"],
           "data2vec_vision.pooler.layernorm.bias": sd["fc_norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(ENC["depth"]):
        pre, hf = f"blocks.{i}.", f"data2vec_vision.encoder.layer.{i}."
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                out[f"{hf}{theirs}.{leaf}"] = sd[f"{pre}{ours}.{leaf}"]
        q, k, v = sd[pre + "attn.qkv.weight"].chunk(3)
        qb, _, vb = sd[pre + "attn.qkv.bias"].chunk(3)
        out.update({hf + "attention.attention.query.weight": q, hf + "attention.attention.query.bias": qb,
                    hf + "attention.attention.key.weight": k, hf + "attention.attention.value.weight": v,
                    hf + "attention.attention.value.bias": vb,
                    hf + "lambda_1": sd[pre + "ls1.gamma"], hf + "lambda_2": sd[pre + "ls2.gamma"]})
    return out


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


LAYOUTS = {"timm": (lambda sd: sd, "timm"), "dino_backbone": (lambda sd: sd, "timm"), "dino_full": (dino_full, "dino"),
           "ibot_full": (ibot_full, "ibot"), "ibot_teacher": (ibot_teacher, "ibot"), "mae": (mae_checkpoint, "mae")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_official_layout_starts_the_encoder_and_the_ema_teacher(layout, tmp_path):
    source = _vit()
    make, expected = LAYOUTS[layout]
    path = tmp_path / "released.pth"
    torch.save(make(source.state_dict()), path)
    dino = build_method("dino", encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(ENC), n_prototypes=16,
                        projector_hidden_dim=8, projector_bottleneck_dim=8)
    assert load_encoder_init(dino, path) == expected
    _same_outputs(dino.student.backbone, source)  # student and EMA teacher both start from the weights
    _same_outputs(dino.teacher.backbone, source)


def test_data2vec_hugging_face_layout_joins_query_key_value_and_layer_scale(tmp_path):
    source = _vit(init_values=0.1, global_pool="avg")
    with torch.no_grad():
        for block in source.blocks:  # BEiT-style attention has no key bias
            block.attn.qkv.bias[32:64].zero_()
    torch.save(hf_data2vec(source.state_dict()), tmp_path / "pytorch_model.bin")
    method = build_method("data2vec", encoder_name="vit_tiny_patch16_224", top_k_blocks=1, image_size=16,
                          encoder_kwargs={**ENC, "init_values": 0.1, "global_pool": "avg"})
    assert load_encoder_init(method, tmp_path / "pytorch_model.bin") == "data2vec"
    _same_outputs(method.teacher, source)
    _same_outputs(method.ts.student, source)


def test_fairseq_data2vec2_and_relative_position_checkpoints_are_refused_with_the_reason():
    with pytest.raises(CheckpointError, match="post-LayerNorm"):
        to_timm({"model": None, "modality_encoders.IMAGE.local_encoder.proj.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="relative position"):
        to_timm({"data2vec_vision.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table":
                 torch.zeros(1)})


def test_mae_encoder_from_a_larger_grid_gets_resampled_positions(tmp_path):
    source = _vit(img_size=32)  # 8 x 8 patches; the run's encoder has 4 x 4
    torch.save(mae_checkpoint(source.state_dict()), tmp_path / "mae.pth")
    mae = build_method("mae", encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(ENC), decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2, encoder_pos_embed="learned")
    assert load_encoder_init(mae, tmp_path / "mae.pth") == "mae"
    expected = timm.layers.resample_abs_pos_embed(source.pos_embed.detach(), [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(mae.encoder.pos_embed.detach(), expected)
    torch.testing.assert_close(mae.encoder.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_mismatched_architecture_names_missing_unexpected_keys_and_shapes(tmp_path):
    torch.save(_vit(depth=3, embed_dim=48, num_heads=2).state_dict(), tmp_path / "big.pth")
    mae = build_method("mae", encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(ENC), decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_init(mae, tmp_path / "big.pth")
    msg = str(info.value)
    assert "method.encoder_init" in msg and "unexpected keys [blocks.2." in msg
    assert "cls_token: checkpoint (1, 1, 48) vs model (1, 1, 32)" in msg


def test_bad_encoder_init_is_refused_before_ray_starts(tmp_path):
    torch.save(_vit(embed_dim=48, num_heads=2).state_dict(), tmp_path / "wide.pth")
    raw = tiny_spec_dict(tmp_path)
    raw["method"]["encoder_init"] = str(tmp_path / "wide.pth")
    spec = spec_from_dict(raw)
    assert "encoder_init" not in method_kwargs(spec.method)  # the platform's key, not a constructor argument
    with pytest.raises(CheckpointError, match=r"method.encoder_init .*wide.pth.*shape mismatch"):
        preflight(spec)
    raw["method"]["encoder_init"] = str(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="method.encoder_init: expected an existing checkpoint file"):
        preflight(spec_from_dict(raw))


def test_encoder_init_from_s3_is_downloaded_once_and_read(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("SSL_PLATFORM_CACHE", str(tmp_path / "cache"))
    source = _vit()
    torch.save(dino_full(source.state_dict()), tmp_path / "dino.pth")
    boto3.client("s3").upload_file(str(tmp_path / "dino.pth"), s3_server["bucket"], "released/dino.pth")
    spec = spec_from_dict(tiny_spec_dict(tmp_path))
    local = localize_encoder_init(f"s3://{s3_server['bucket']}/released/dino.pth", spec.checkpoint)
    assert local.is_file() and Path(tmp_path / "cache") in local.parents
    sd, layout = to_timm(read_checkpoint(local))
    assert layout == "dino" and torch.equal(sd["blocks.1.attn.qkv.weight"], source.blocks[1].attn.qkv.weight)
