#!/usr/bin/env python3
"""NeMo-layout fixtures: the key names NeMo's Stable Diffusion U-Net and ControlNet use, derived by NeMo's own code.

NeMo's SD code left NeMo's main branch; this script reads it from NVIDIA/NeMo at commit
cf73f6d55a95c86442645f00642df12d78f530de (see ../shared/NEMO-NOTES.md). It does not import NeMo (that needs
Megatron, Apex and Transformer Engine); it takes the two key-mapping methods of `UNetModel` out of
`openaimodel.py` with Python's `ast` module and runs them unchanged:
- `_legacy_unet_ckpt_mapping`: the original LDM names -> NeMo's module names (what NeMo's model holds, and so what
  a NeMo training checkpoint stores);
- `te_fp8_key_mapping`: NeMo's names -> those of its Transformer Engine (fp8) modules.

Written to tests/fixtures/nemo/:
- `names.json`: for the LDM keys of the tiny SD 1.5 parity model (tests/fixtures/parity/sd15_tiny.keys.json, U-Net
  and ControlNet), `{"plain": {nemo_key: ldm_key}, "te_fp8": {nemo_key: ldm_key}}`, the NeMo key as it appears in a
  NeMo training checkpoint (`model.model.diffusion_model.*`, `model.control_model.*`);
- `training.ckpt`: a NeMo training checkpoint as PyTorch Lightning saves it (`torch.save` of a dict with
  `state_dict`, `hyper_parameters`, `epoch`, `global_step`), holding the first transformer block of the U-Net and of
  the ControlNet under NeMo's names with the parity generator's values (make_parity_fixtures.py), schedule buffers,
  and Transformer Engine `_extra_state` entries, to check the container path end to end. Small on purpose; the full
  name list is in names.json.

Usage:
    git -C NeMo show cf73f6d55a:nemo/collections/multimodal/modules/stable_diffusion/diffusionmodules/openaimodel.py \
        > /tmp/openaimodel.py
    /work/torchenv/bin/python scripts/make_nemo_fixture.py /tmp/openaimodel.py
(torch 2.15.0, numpy 2.4.6)
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from make_parity_fixtures import generated_tensor, load_key_list  # noqa: E402

OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "nemo"
UNET = "model.diffusion_model."
CONTROL = "control_model."


def nemo_methods(source: str) -> dict:
    """The mapping methods of openaimodel.py's UNetModel, compiled on their own (they only need `re`)."""
    tree = ast.parse(source)
    unet = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UNetModel")
    wanted = {"_legacy_unet_ckpt_mapping", "te_fp8_key_mapping"}
    found = [f for f in unet.body if isinstance(f, ast.FunctionDef) and f.name in wanted]
    if {f.name for f in found} != wanted:
        raise SystemExit(f"openaimodel.py: UNetModel lacks {wanted - {f.name for f in found}}")
    module = ast.Module(body=found, type_ignores=[])
    namespace = {"re": re}
    exec(compile(module, "openaimodel.py", "exec"), namespace)
    return {name: namespace[name] for name in wanted}


def nemo_names(methods: dict, ldm_keys: list[str], prefix: str, te_fp8: bool) -> dict[str, str]:
    """{NeMo module name: LDM name} for the keys under `prefix` (stripped for NeMo's functions, as its loader does)."""
    inner = {k[len(prefix) :]: k for k in ldm_keys if k.startswith(prefix)}
    mapped = methods["_legacy_unet_ckpt_mapping"](None, dict(inner))
    if te_fp8:
        mapped = methods["te_fp8_key_mapping"](None, mapped)
    if len(mapped) != len(inner):
        raise SystemExit(f"{prefix}: NeMo's mapping merged or dropped keys ({len(inner)} -> {len(mapped)})")
    return dict(mapped)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    methods = nemo_methods(Path(sys.argv[1]).read_text())
    keys = load_key_list("sd15_tiny")
    shapes = dict(keys)
    ldm_keys = [k for k, _ in keys]
    names: dict[str, dict[str, str]] = {}
    for variant, te in (("plain", False), ("te_fp8", True)):
        table: dict[str, str] = {}
        # The Megatron wrapper puts the LDM model under `model.`: the U-Net at model.model.diffusion_model.
        for prefix, wrapped in ((UNET, "model.model.diffusion_model."), (CONTROL, "model.control_model.")):
            for nemo, ldm in nemo_names(methods, ldm_keys, prefix, te).items():
                table[wrapped + nemo] = ldm
        names[variant] = dict(sorted(table.items()))
    if not any(".attn1.norm." in n for n in names["plain"]):
        raise SystemExit("NeMo's mapping renamed no transformer key: not the expected openaimodel.py?")

    # The container: a Lightning checkpoint with the first transformer block of each model.
    block = ".input_blocks.1.1.transformer_blocks.0."
    state: dict[str, torch.Tensor] = {}
    for nemo, ldm in names["plain"].items():
        if block in nemo:
            state[nemo] = torch.from_numpy(generated_tensor(ldm, shapes[ldm]).copy())
    state["model.betas"] = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    state["model.model.diffusion_model" + block + "attn1.norm_to_q._extra_state"] = torch.tensor([], dtype=torch.uint8)
    checkpoint = {
        "epoch": 0,
        "global_step": 7,
        "state_dict": state,
        "hyper_parameters": {"cfg": {"unet_config": {"from_NeMo": True}}},
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "names.json").write_text(json.dumps(names, indent=1) + "\n")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    (OUT_DIR / "training.ckpt").write_bytes(buffer.getvalue())
    print(f"names.json: {len(names['plain'])} keys per variant; training.ckpt: {len(state)} entries, "
          f"{len(buffer.getvalue())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
