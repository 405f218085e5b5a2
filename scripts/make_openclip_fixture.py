#!/usr/bin/env python3
"""Regenerates tests/fixtures/open_clip/: a tiny OpenCLIP model with random weights, written by open_clip and torch
in the two layouts SD 2.x users bring, and what SD 2's text encoder computes with it. tests/io_formats/open_clip.rs loads the
files through zeroconv's checkpoint loaders and compares.

Written with torch 2.15.0, open_clip_torch 3.3.0 (ftfy 6.3.1, regex 2026.11.19), diffusers 0.42.1, transformers
5.24.0 and safetensors 0.8.0.

The model is an `open_clip.CLIP` with a custom architecture: a text tower of width 24, 3 heads, 3 layers, MLP 96,
context 77, exact GELU (open_clip's default, as in ViT-H-14), and a one-block vision tower (only there so that the
state dict is a whole CLIP's). Every parameter is random (layer-norm scales and biases too, so that swapped names
would show), rounded to float16 so that the float16 file below holds exactly the same values as the float32 one.

Its vocabulary is the 909-token BPE of tests/fixtures/tokenizer/ (`merges.txt`, which has open_clip's bpe file
format: a header line, then one merge per line): open_clip's `SimpleTokenizer` built from it must number every token
as that fixture's `vocab.json` does (checked here), so zeroconv's tokenizer reads the same vocabulary from
vocab.json + merges.txt.

Files:
- `sd2_text_encoder.safetensors`: the layout of the original SD 2 checkpoints: `FrozenOpenCLIPEmbedder` deletes
  `model.visual`, and LatentDiffusion saves the rest under `cond_stage_model.model.` (`token_embedding.weight`,
  `positional_embedding`, `transformer.resblocks.{i}.attn.in_proj_weight`, ..., `ln_final.*`, `text_projection`,
  `logit_scale`); float32, written by safetensors from open_clip's `state_dict()`.
- `open_clip_model.bin`: `torch.save(model.state_dict())` of the whole CLIP, vision tower included, no prefix (the
  layout of open_clip's `open_clip_pytorch_model.bin`), in float16.
- `sd2_diffusers_text_encoder/`: what diffusers makes of that SD 2 file: its own conversion
  (`single_file_utils.convert_open_clip_checkpoint`) into a transformers `CLIPTextModel` configured as SD 2's
  `text_encoder/config.json` is (`hidden_act: gelu`, one layer fewer than the tower: 23 of ViT-H-14's 24), loaded as
  diffusers loads it (the dropped layer's keys and the projection unused), saved by `save_pretrained` in float16
  (transformers 5: keys without `text_model.`). Its last layer is SD 2's penultimate one (checked here).
- `sd2_text_encoder_part.nemo`: part of the text tower as a NeMo SD 2 model saves it (the Megatron wrapper's extra
  `model.`: `model.cond_stage_model.model.*`) in a `.nemo` tar (`model_config.yaml` + a torch.save'd
  `model_weights.ckpt`, as NeMo's SaveRestoreConnector writes it): block 1's in-projection, stored as a transposed
  view (a strided tensor, which torch.save keeps as it is), its bias, `ln_final.weight` and `logit_scale`.
- `expected.safetensors`: `ids` [3, 77] (int64): the captions (in the metadata, `captions`, as JSON) as SD 2
  tokenizes them (`open_clip.tokenize`: BOS, tokens, EOS, zeros after; cut to 77 with EOS last) but with the fixture
  vocabulary; `penultimate` and `last` [3, 77, 24] (float32): `FrozenOpenCLIPEmbedder.encode_with_transformer` with
  layer "penultimate" (layer_idx 1: stop one block early, then ln_final; SD 2's setting) and "last" (layer_idx 0).
  The metadata also holds `vit_h_14_text_cfg`, open_clip's own ViT-H-14 text config, which the config's
  `arch: ViT-H-14` must reproduce.

Setup and run (open_clip and transformers into the shared torch environment):
    /work/torchenv/bin/pip install open-clip-torch==3.3.0 transformers==5.24.0
    /work/torchenv/bin/python -B scripts/make_openclip_fixture.py
"""

import gzip
import io
import json
import os
import tarfile
import tempfile

import open_clip
import safetensors
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")
OUT_DIR = os.path.join(HERE, "..", "tests", "fixtures", "open_clip")
SD2_PREFIX = "cond_stage_model.model."

WIDTH, HEADS, LAYERS, CONTEXT = 24, 3, 3, 77

# Plain captions on which open_clip's cleanup (ftfy, html.unescape, whitespace, lower case) and transformers' slow
# CLIPTokenizer without ftfy (which zeroconv reproduces) agree; the last is cut to 77 ids.
CAPTIONS = [
    "a photo of a cat sitting on a wooden table",
    "  Two DOGS playing in the snow,   high quality ",
    " ".join(["a red car parked in front of a modern building at night, with neon lights"] * 6),
]


def fixture_tokenizer():
    """open_clip's SimpleTokenizer over the fixture's merges, checked against the fixture's vocab.json."""
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), encoding="utf-8") as f:
        # SimpleTokenizer keeps every line after the header as a merge: no empty last line.
        merges = f.read().rstrip("\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bpe.txt.gz")
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(merges)
        tok = SimpleTokenizer(bpe_path=path, context_length=CONTEXT)
    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    # open_clip spells the two special tokens differently; they are the same ids.
    names = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    theirs = {names.get(t, t): i for t, i in vocab.items()}
    if theirs != tok.encoder:
        raise SystemExit("open_clip numbers the fixture vocabulary differently from vocab.json")
    assert tok.encoder["!"] == 0, "SD 2 pads with id 0, the token '!'"
    return tok


def build_model(vocab_size):
    torch.manual_seed(0)
    text = CLIPTextCfg(context_length=CONTEXT, vocab_size=vocab_size, width=WIDTH, heads=HEADS, layers=LAYERS)
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=False).eval()
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # layer-norm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
            # Exactly representable in float16, so both files hold the same values.
            p.copy_(p.half().float())
    return model


def encode_with_transformer(model, ids, layer_idx):
    """SD 2's `FrozenOpenCLIPEmbedder.encode_with_transformer` + `text_transformer_forward` (ldm/modules/encoders/
    modules.py; NeMo's copy is the same), verbatim but for one adaptation: it was written for open_clip 2.0, whose
    residual blocks took sequence-first input, hence its NLD -> LND permutes; open_clip 3's blocks are batch-first,
    so the permutes apply only when the transformer says it is not."""
    x = model.token_embedding(ids)
    x = x + model.positional_embedding
    seq_first = not getattr(model.transformer, "batch_first", False)
    if seq_first:
        x = x.permute(1, 0, 2)
    blocks = model.transformer.resblocks
    for i, r in enumerate(blocks):
        if i == len(blocks) - layer_idx:
            break
        x = r(x, attn_mask=model.attn_mask)
    if seq_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)


def diffusers_text_encoder(sd2, vocab_size, penultimate, ids):
    """diffusers' conversion of SD 2's text encoder, checked to give the penultimate layer's output."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS - 1,
        num_attention_heads=HEADS,
        max_position_embeddings=CONTEXT,
        hidden_act="gelu",
        projection_dim=16,
        pad_token_id=0,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )
    model = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(model, sd2)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; diffusers strips the prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    own = model.state_dict()
    unused = sorted(k for k in converted if k not in own)
    dropped = f"encoder.layers.{LAYERS - 1}."
    assert all(dropped in k or k.startswith("text_projection") for k in unused), unused
    missing = [k for k in own if k not in converted and not k.endswith("position_ids")]
    assert not missing, missing
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    err = (hidden - penultimate).abs().max().item()
    assert err < 1e-5, f"diffusers' SD 2 text encoder differs from the penultimate layer by {err}"
    return model.half()


NEMO_CONFIG = """\
cond_stage_config:
  _target_: nemo.collections.multimodal.modules.stable_diffusion.encoders.modules.FrozenOpenCLIPEmbedder
  arch: ViT-H-14
  version: laion2b_s32b_b79k
  device: cuda
  max_length: 77
  freeze: True
  layer: penultimate
"""


def write_nemo_part(state, path):
    """A few text-tower tensors as NeMo saves an SD 2 model: `model.` + the LDM keys, in a .nemo tar."""
    part = {}
    for name in ["transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_bias",
                 "ln_final.weight", "logit_scale"]:
        part["model." + SD2_PREFIX + name] = state[name].clone()
    stacked = part["model." + SD2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"]
    view = stacked.t().contiguous().t()  # the same values, stored column by column
    assert not view.is_contiguous() and torch.equal(view, stacked)
    part["model." + SD2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"] = view
    buf = io.BytesIO()
    torch.save(part, buf)
    with tarfile.open(path, "w:") as tar:
        for name, data in [("./model_config.yaml", NEMO_CONFIG.encode()), ("./model_weights.ckpt", buf.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    tok = fixture_tokenizer()
    model = build_model(len(tok.encoder))
    ids = tok(CAPTIONS, context_length=CONTEXT)
    assert ids[2, -1] == tok.eot_token_id and (ids[2] != 0).all(), "the long caption is cut with EOS last"
    with torch.no_grad():
        penultimate = encode_with_transformer(model, ids, 1)
        last = encode_with_transformer(model, ids, 0)
        # layer "last" is exactly the text tower's own token output (before pooling and projection).
        assert torch.allclose(last, model.ln_final(model.transformer(
            model.token_embedding(ids) + model.positional_embedding, attn_mask=model.attn_mask)), atol=1e-6)

    state = model.state_dict()
    sd2 = {SD2_PREFIX + k: v.contiguous() for k, v in state.items() if not k.startswith("visual.")}
    save_file(sd2, os.path.join(OUT_DIR, "sd2_text_encoder.safetensors"))
    torch.save({k: v.half() for k, v in state.items()}, os.path.join(OUT_DIR, "open_clip_model.bin"))
    write_nemo_part(state, os.path.join(OUT_DIR, "sd2_text_encoder_part.nemo"))
    hf = diffusers_text_encoder(sd2, len(tok.encoder), penultimate, ids)
    hf.save_pretrained(os.path.join(OUT_DIR, "sd2_diffusers_text_encoder"))

    vit_h = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    metadata = {
        "captions": json.dumps(CAPTIONS),
        "vit_h_14_text_cfg": json.dumps(vit_h),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    expected = {"ids": ids.to(torch.int64), "penultimate": penultimate.float(), "last": last.float()}
    save_file(expected, os.path.join(OUT_DIR, "expected.safetensors"), metadata=metadata)
    for base, _, files in sorted(os.walk(OUT_DIR)):
        for name in sorted(files):
            path = os.path.join(base, name)
            print(f"{os.path.relpath(path, OUT_DIR)}: {os.path.getsize(path)} bytes")
    print("ids:", [row[row != 0].tolist() for row in ids])
    print(f"safetensors {safetensors.__version__}, open_clip {open_clip.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
