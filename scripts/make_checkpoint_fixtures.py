#!/usr/bin/env python3
"""Writes the checkpoint fixtures of tests/checkpoint.rs with real PyTorch and safetensors.

The fixtures are tiny (a few KB each) and committed, so the Rust tests need no Python. Re-run this script only to
regenerate them (the output is deterministic except for the random serialization id torch puts in each zip):

    pip install --target .tools/py torch safetensors numpy      # .tools/ is git-ignored
    PYTHONPATH=.tools/py python3 scripts/make_checkpoint_fixtures.py

Every value is a small multiple of 1/8, exact in f16, bf16, f32 and f64, so the expected values in expected.json
compare exactly (no tolerance) against what the Rust reader decodes.
"""

import collections
import io
import json
import os
import sys
import tarfile
import types

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "checkpoint")


def eighths(n, start=-20):
    """n distinct values k/8, small enough to be exact in every float dtype."""
    return (torch.arange(n, dtype=torch.float64) + start) / 8.0


def tiny_state_dict():
    """A state dict exercising every dtype and the tensor layouts torch.save can produce."""
    linear = eighths(12).reshape(4, 3).float()
    wide = eighths(24, start=-5).reshape(4, 6).float()
    sd = collections.OrderedDict()
    sd["model.diffusion_model.input_blocks.0.0.weight"] = eighths(4 * 3 * 3 * 3, start=-50).reshape(4, 3, 3, 3).float()
    sd["model.diffusion_model.input_blocks.0.0.bias"] = eighths(4, start=3).float()
    sd["half.weight"] = eighths(10).reshape(2, 5).half()
    sd["bf16.weight"] = eighths(6, start=-2).reshape(3, 2).bfloat16()
    sd["f64.buffer"] = eighths(3, start=7)
    sd["i64.steps"] = torch.tensor([3, -4_000_000_000], dtype=torch.int64)
    sd["i32.index"] = torch.tensor([1, -2, 70000], dtype=torch.int32)
    sd["linear.weight"] = linear
    # A transposed view sharing linear's storage: non-contiguous strides (1, 3).
    sd["linear.weight_t"] = linear.t()
    # A row slice: contiguous, but at a non-zero storage offset of wide's storage.
    sd["wide.rows"] = wide[1:3]
    # A column slice: non-contiguous with a storage offset.
    sd["wide.cols"] = wide[:, 1::2]
    sd["scalar"] = torch.tensor(2.625)
    sd["empty"] = torch.zeros(0, 3)
    # Saved as an nn.Parameter: pickled through torch._utils._rebuild_parameter.
    sd["param.weight"] = torch.nn.Parameter(eighths(5, start=1).float())
    # bool is outside zeroconv's dtypes: the reader must skip it and say so, not fail.
    sd["mask"] = torch.tensor([True, False, True])
    return sd


def fake_lightning_class():
    """A class that pickles as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, which the Rust reader
    has never heard of: it must come back as an opaque object without breaking the state dict."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    for i, part in enumerate(name.split(".")):
        mod_name = ".".join(name.split(".")[: i + 1])
        sys.modules.setdefault(mod_name, types.ModuleType(mod_name))

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"
            self.best_model_score = torch.tensor(0.125)
            self.kth_best_model_path = ""

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    setattr(sys.modules[name], "ModelCheckpoint", ModelCheckpoint)
    return ModelCheckpoint


def lightning_checkpoint():
    """What pytorch_lightning's Trainer.save_checkpoint writes: the weights sit under "state_dict"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(eighths(p.numel(), start=-3 * i).reshape(p.shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    callback_cls = fake_lightning_class()
    state_dict = collections.OrderedDict(("model." + k, v) for k, v in model.state_dict().items())
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": callback_cls()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "betas": (0.9, 0.999), "name": "tiny"},
    }


def nemo_state_dict():
    """Keys as NeMo's MegatronControlNet saves them: the LDM model sits under an extra "model." (the Megatron
    wrapper), torch.compile adds "_orig_mod.", and ResBlocks' fused GroupNorm+SiLU shifts conv indices."""
    sd = collections.OrderedDict()
    sd["model.model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = eighths(4, start=1).float()
    sd["model.model.diffusion_model.input_blocks.1.0.in_layers.1.weight"] = eighths(8, start=-4).reshape(2, 4).float()
    sd["model.model.diffusion_model.input_blocks.1.0.out_layers.2.bias"] = eighths(2).float()
    sd["model.model._orig_mod.diffusion_model.out.2.weight"] = eighths(3).float()
    sd["model.control_model.input_hint_block.0.weight"] = eighths(6, start=2).reshape(2, 3).half()
    sd["model.control_model.zero_convs.0.0.weight"] = torch.zeros(2, 2, 1, 1)
    sd["model.control_model.middle_block.0.in_layers.1.bias"] = eighths(2, start=9).float()
    sd["model.first_stage_model.encoder.conv_in.weight"] = eighths(4, start=-1).float()
    sd["model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = eighths(6).reshape(3, 2).bfloat16()
    sd["model.betas"] = eighths(5, start=1).double()
    return sd


NEMO_CONFIG = """\
precision: 16
control_key: hint
only_mid_control: false
sd_locked: true
control_stage_config:
  _target_: nemo.collections.multimodal.models.text_to_image.controlnet.controlnet.ControlNet
  params:
    model_channels: 320
    hint_channels: 3
"""


def torch_bytes(obj, **kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def write_nemo(path, weights, gz, members=("./model_weights.ckpt",)):
    with tarfile.open(path, "w:gz" if gz else "w:") as tar:
        files = [("./model_config.yaml", NEMO_CONFIG.encode())] + [(m, weights) for m in members]
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def describe(tensors):
    """Expected dtype, shape and every value (as f64) for each tensor the Rust reader must return."""
    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
             torch.int64: "i64", torch.int32: "i32"}
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in names:
            continue
        values = t.detach().to(torch.float64).flatten().tolist()
        out[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "values": values, "sum": sum(values)}
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}

    sd = tiny_state_dict()
    with open(os.path.join(OUT, "tiny.ckpt"), "wb") as f:
        f.write(torch_bytes(sd))
    expected["tiny.ckpt"] = {"tensors": describe(sd), "skipped": ["mask"]}

    # safetensors refuses shared or non-contiguous tensors: store contiguous copies.
    plain = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    save_file(plain, os.path.join(OUT, "tiny.safetensors"), metadata={"format": "pt", "source": "make_checkpoint_fixtures"})
    expected["tiny.safetensors"] = {"tensors": describe(plain), "skipped": ["mask"],
                                    "metadata": {"format": "pt", "source": "make_checkpoint_fixtures"}}

    light = lightning_checkpoint()
    with open(os.path.join(OUT, "lightning.ckpt"), "wb") as f:
        f.write(torch_bytes(light))
    expected["lightning.ckpt"] = {"tensors": describe(light["state_dict"]), "skipped": [],
                                  "metadata": {"epoch": "3", "global_step": "1234", "pytorch-lightning_version": "2.4.0",
                                               "hparams_name": "kwargs"}}

    nemo_sd = nemo_state_dict()
    weights = torch_bytes(nemo_sd)
    write_nemo(os.path.join(OUT, "tiny.nemo"), weights, gz=False)
    write_nemo(os.path.join(OUT, "tiny_gz.nemo"), weights, gz=True)
    for name in ["tiny.nemo", "tiny_gz.nemo"]:
        expected[name] = {"tensors": describe(nemo_sd), "skipped": [], "config": NEMO_CONFIG}

    # The same state dict pickled with protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE opcodes).
    with open(os.path.join(OUT, "tiny_proto4.ckpt"), "wb") as f:
        f.write(torch_bytes(sd, pickle_protocol=4))
    expected["tiny_proto4.ckpt"] = expected["tiny.ckpt"]

    # Weights nested under a key the reader does not guess: it must say what it found instead.
    with open(os.path.join(OUT, "nested.pth"), "wb") as f:
        f.write(torch_bytes({"model": {"w": torch.ones(2)}, "epoch": 1}))

    # A tensor-parallel .nemo: one weights file per rank, which must be refused with a clear message.
    write_nemo(os.path.join(OUT, "sharded.nemo"), torch_bytes({"w": torch.ones(1)}), gz=False,
               members=("./mp_rank_00/model_weights.ckpt", "./mp_rank_01/model_weights.ckpt"))

    # The pre-1.6 format (a pickle followed by raw storages), which the reader must recognise and refuse clearly.
    with open(os.path.join(OUT, "legacy.pt"), "wb") as f:
        f.write(torch_bytes({"w": torch.ones(2)}, _use_new_zipfile_serialization=False))

    expected["_generator"] = {"torch": torch.__version__}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
