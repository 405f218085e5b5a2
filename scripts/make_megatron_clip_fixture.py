#!/usr/bin/env python3
"""NeMo's Megatron CLIP text encoder (`FrozenMegatronCLIPEmbedder`) fixtures: the tiny open_clip model of
tests/fixtures/open_clip/, converted to NeMo's CLIP names by NeMo's own conversion code.

NeMo's SD code left NeMo's main branch; this script reads NVIDIA/NeMo at commit
cf73f6d55a95c86442645f00642df12d78f530de (../shared/NEMO-NOTES.md) with `git show`. It does not import NeMo (that
needs Megatron, Apex and Lightning); it takes two functions out of NeMo's sources with Python's `ast` module and
runs them unchanged:
- `mapping_openclip_state_dict` (examples/multimodal/vision_language_foundation/clip/convert_external_clip_to_nemo.py):
  an open_clip `CLIP`'s state dict -> NeMo `CLIPModel` names (`text_encoder.language_model.*`, `vision_encoder.*`,
  `logit_scale`). Its body needs only the model's `state_dict()` and tensor methods; nothing is stubbed: the file's
  module-level imports (lightning, NeMo, Megatron core, open_clip, transformers) are simply not executed.
- `ParallelAttention._transpose_last_dim` (nemo/collections/nlp/modules/common/megatron/attention.py): how NeMo's
  attention turns a `megatron_legacy` query_key_value output ([3, heads, head_dim]) into its own per-head order
  ([heads, 3, head_dim]). It reads two attributes of `self`, given by a `types.SimpleNamespace` stand-in
  (`num_attention_heads_per_partition`, `hidden_size_per_attention_head`: tensor parallel size 1). Applied to the
  rows of a legacy `query_key_value` (the output dimension of `x Wᵀ + b`), it gives the weights of a CLIP trained
  with `megatron_legacy: False`, which compute the same thing.

What NeMo's code does not do here and this script does, said plainly:
- Vocabulary padding. NeMo's CLIP holds `word_embeddings` with the tokenizer's vocabulary padded up to a multiple
  of `make_vocab_size_divisible_by` (128) x tensor parallel size (`_vocab_size_with_padding`). The converter copies
  open_clip's [vocab, width] table (real CLIP vocabularies, 49408, are already a multiple of 128); the fixture's
  909-token vocabulary is not, so the 115 rows NeMo's model would hold beyond it are appended, random (as the
  model's initialisation leaves them: nothing ever loads into or reads them).
- The containers. An SD model's `FrozenMegatronCLIPEmbedder` keeps `CLIPModel.text_encoder` as `self.model`
  (`load_model`, after stripping the `.nemo` keys' `model.`), so SD checkpoints hold it under
  `cond_stage_model.model.` and NeMo's Megatron-wrapped training checkpoints under `model.cond_stage_model.model.`;
  a CLIP `.nemo` holds `MegatronCLIPModel.model` (the `CLIPModel`) under `model.` in `model_weights.ckpt`, beside
  `model_config.yaml`, in a tar (NeMo's SaveRestoreConnector layout; written here with tarfile).

The model is the open_clip fixture's (make_openclip_fixture.py: width 24, 3 heads, 3 layers, MLP 96, exact GELU,
context 77, the 909-token vocabulary of tests/fixtures/tokenizer/), loaded from `open_clip_model.bin`; before
converting, this script checks that SD 2's `encode_with_transformer` on it reproduces that fixture's
`expected.safetensors` (`penultimate`, `last`) exactly, so those outputs are the reference for these files too. All
values are float16-exact (the open_clip fixture rounds them), so the files are float16.

Written to tests/fixtures/nemo/:
- `megatron_clip_sd.safetensors`: `cond_stage_model.model.*`, `megatron_legacy: True` order (what the OpenCLIP
  converter writes: open_clip's `in_proj_weight` unchanged), `head.weight` included;
- `megatron_clip_sd_interleaved.ckpt`: a Lightning-style `torch.save({"state_dict": ...})` of a Megatron-wrapped
  NeMo SD model (`model.cond_stage_model.model.*`), with `megatron_legacy: False` (per-head interleaved)
  query_key_value rows;
- `megatron_clip.nemo`: a CLIP `.nemo`, what `restore_from_path` names: `model_config.yaml` (NeMo's
  megatron_clip_VIT-H-14.yaml `model` section with the fixture's text sizes; `megatron_legacy: True`) and
  `model_weights.ckpt` (`model.text_encoder.*`, `model.vision_encoder.*`, `model.logit_scale`).

Written with torch 2.15.0, open_clip_torch 3.3.0, safetensors 0.8.0, PyYAML 6.0.4.
Run:
    /work/torchenv/bin/python -B scripts/make_megatron_clip_fixture.py [NEMO_GIT_DIR]
(NEMO_GIT_DIR: a clone or bare mirror of NVIDIA/NeMo holding the commit; default /work/.mirror/NVIDIA+NeMo/repo)
"""

import ast
import io
import os
import subprocess
import sys
import tarfile
import types

import open_clip
import safetensors
import safetensors.torch
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_openclip_fixture import build_model, encode_with_transformer, fixture_tokenizer  # noqa: E402

COMMIT = "cf73f6d55a95c86442645f00642df12d78f530de"
CONVERTER = "examples/multimodal/vision_language_foundation/clip/convert_external_clip_to_nemo.py"
ATTENTION = "nemo/collections/nlp/modules/common/megatron/attention.py"
CLIP_CONFIG = "examples/multimodal/vision_language_foundation/clip/conf/megatron_clip_VIT-H-14.yaml"
OPEN_CLIP_DIR = os.path.join(HERE, "..", "tests", "fixtures", "open_clip")
OUT_DIR = os.path.join(HERE, "..", "tests", "fixtures", "nemo")
WIDTH, HEADS, LAYERS, MLP, CONTEXT = 24, 3, 3, 96, 77
VOCAB_MULTIPLE = 128


def nemo_source(git_dir, path):
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def nemo_function(source, name, cls=None, namespace=None):
    """A function (or a method of class `cls`) of NeMo's `source`, compiled on its own."""
    body = ast.parse(source).body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = [f for f in body if isinstance(f, ast.FunctionDef) and f.name == name]
    if len(found) != 1:
        raise SystemExit(f"{name} not found once in NeMo's source")
    scope = dict(namespace or {})
    exec(compile(ast.Module(body=found, type_ignores=[]), name, "exec"), scope)
    return scope[name]


def reference_model():
    """The open_clip fixture's model, checked against that fixture's outputs."""
    tok = fixture_tokenizer()
    model = build_model(len(tok.encoder))
    state = torch.load(os.path.join(OPEN_CLIP_DIR, "open_clip_model.bin"), map_location="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    expected = safetensors.torch.load_file(os.path.join(OPEN_CLIP_DIR, "expected.safetensors"))
    with torch.no_grad():
        for layer, idx in [("penultimate", 1), ("last", 0)]:
            got = encode_with_transformer(model, expected["ids"], idx)
            err = (got - expected[layer]).abs().max().item()
            assert err < 1e-6, f"the reloaded open_clip model differs from expected.safetensors[{layer}] by {err}"
    return model, len(tok.encoder)


def interleave(transpose_last_dim, legacy):
    """The per-head order of a legacy query_key_value tensor, by NeMo's own `_transpose_last_dim`."""
    attention = types.SimpleNamespace(num_attention_heads_per_partition=HEADS,
                                      hidden_size_per_attention_head=WIDTH // HEADS)
    if legacy.dim() == 1:
        return transpose_last_dim(attention, legacy, 3, True)
    return transpose_last_dim(attention, legacy.t(), 3, True).t().contiguous()


def clip_config(vit_h_14_yaml):
    """NeMo's ViT-H-14 CLIP model config with the fixture's text tower sizes, interpolations resolved."""
    text = yaml.safe_load(vit_h_14_yaml)["model"]
    text["text"].update(hidden_size=WIDTH, num_layers=LAYERS, num_attention_heads=HEADS, ffn_hidden_size=MLP,
                        encoder_seq_length=CONTEXT, max_position_embeddings=CONTEXT, output_dim=16)
    text["vision"].update(output_dim=16)
    text["output_dim"] = 16
    assert text["text"]["megatron_legacy"] is True and text["text"]["bias_activation_fusion"] is False
    assert text["text"]["position_embedding_type"] == "learned_parameters"
    return yaml.safe_dump(text, sort_keys=False)


def write_nemo(path, config_yaml, weights):
    buf = io.BytesIO()
    torch.save(weights, buf)
    with tarfile.open(path, "w:") as tar:
        for name, data in [("./model_config.yaml", config_yaml.encode()), ("./model_weights.ckpt", buf.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def main():
    git_dir = sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/NVIDIA+NeMo/repo"
    torch.set_num_threads(1)
    mapping = nemo_function(nemo_source(git_dir, CONVERTER), "mapping_openclip_state_dict")
    transpose_last_dim = nemo_function(nemo_source(git_dir, ATTENTION), "_transpose_last_dim", cls="ParallelAttention")
    model, vocab = reference_model()

    nemo = mapping(model)  # CLIPModel's names
    words = "text_encoder.language_model.embedding.word_embeddings.weight"
    assert tuple(nemo[words].shape) == (vocab, WIDTH)
    padded = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    torch.manual_seed(1)
    padding = (torch.randn(padded - vocab, WIDTH) * WIDTH ** -0.5).half().float()
    nemo[words] = torch.cat([nemo[words], padding])
    nemo = {k: v.half().contiguous() for k, v in nemo.items()}
    text = {k[len("text_encoder."):]: v for k, v in nemo.items() if k.startswith("text_encoder.")}
    qkv = [k for k in text if ".self_attention.query_key_value." in k]
    assert len(qkv) == 2 * LAYERS, qkv

    os.makedirs(OUT_DIR, exist_ok=True)
    sd = {"cond_stage_model.model." + k: v for k, v in text.items()}
    safetensors.torch.save_file(sd, os.path.join(OUT_DIR, "megatron_clip_sd.safetensors"))

    interleaved = {k: (interleave(transpose_last_dim, v) if k in qkv else v) for k, v in text.items()}
    changed = [k for k in qkv if not torch.equal(interleaved[k], text[k])]
    assert changed == qkv, "the per-head order must differ from the legacy one"
    state = {"model.cond_stage_model.model." + k: v for k, v in interleaved.items()}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0},
               os.path.join(OUT_DIR, "megatron_clip_sd_interleaved.ckpt"))

    write_nemo(os.path.join(OUT_DIR, "megatron_clip.nemo"), clip_config(nemo_source(git_dir, CLIP_CONFIG)), {"model." + k: v for k, v in nemo.items()})
    for name in ["megatron_clip_sd.safetensors", "megatron_clip_sd_interleaved.ckpt", "megatron_clip.nemo"]:
        print(f"{name}: {os.path.getsize(os.path.join(OUT_DIR, name))} bytes")
    print(f"vocabulary {vocab}, padded to {padded}; torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"safetensors {safetensors.__version__}, PyYAML {yaml.__version__}")


if __name__ == "__main__":
    main()
