"""Loader: shards, MTP weights on request, and one clear error per broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import routed
from conftest import edit_config, make_checkpoint
from routed import loader
from routed.errors import RoutedError


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_sharded_checkpoint_with_index_loads_same_weights_reading_each_file_in_order(
        ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = ckpt
    tensors = load_file(folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(folder / "config.json", sharded / "config.json")
    reads: dict[str, list[int]] = {}
    read_into = loader._read_into

    def recording(raw, info, dest) -> None:  # noqa: ANN001
        reads.setdefault(info.file.name, []).append(info.offset)
        read_into(raw, info, dest)

    monkeypatch.setattr(loader, "_read_into", recording)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        a = routed.load_model(folder, torch.float32, progress=False)(ids)
        b = routed.load_model(sharded, torch.float32, progress=False)(ids)
    assert torch.equal(a, b)
    # every file read front to back (the kernel's readahead keeps up; seeks back cost a cold load ~1.5x)
    assert set(reads) == {"model.safetensors", *weight_map.values()}
    assert all(offsets == sorted(offsets) and len(offsets) > 1 for offsets in reads.values())


def test_mtp_weights_load_on_request_and_are_skipped_by_default(tmp_path: Path) -> None:
    folder, _ = make_checkpoint(tmp_path / "m")
    edit_config(folder, num_nextn_predict_layers=1)
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    prefix = "model.layers.2."  # copy the last layer as a stand-in MTP block at index num_hidden_layers = 3
    mtp = {n.replace(prefix, "model.layers.3."): torch.randn(t.shape, generator=g) for n, t in tensors.items()
           if n.startswith(prefix)}
    mtp.update({"model.layers.3.enorm.weight": torch.ones(64), "model.layers.3.hnorm.weight": torch.ones(64),
                "model.layers.3.eh_proj.weight": torch.randn(64, 128, generator=g),
                "model.layers.3.shared_head.norm.weight": torch.ones(64),
                "model.layers.3.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                "model.layers.3.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_file({**tensors, **mtp}, folder / "model.safetensors")
    plain = routed.load_model(folder, torch.float32, progress=False)
    assert len(plain.mtp) == 0
    with_mtp = routed.load_model(folder, torch.float32, mtp=True, progress=False)
    assert torch.equal(with_mtp.mtp[0].eh_proj.weight, mtp["model.layers.3.eh_proj.weight"])
    assert torch.equal(with_mtp.mtp[0].self_attn.kv_b_proj.weight, mtp["model.layers.3.self_attn.kv_b_proj.weight"])
    stacked = with_mtp.mtp[0].mlp.experts.down_proj[5]
    assert torch.equal(stacked, mtp["model.layers.3.mlp.experts.5.down_proj.weight"])


def test_mtp_requested_but_absent_is_an_error(ckpt) -> None:
    folder, _ = ckpt
    with pytest.raises(RoutedError, match="num_nextn_predict_layers is 0"):
        routed.load_model(folder, mtp=True, progress=False)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"tensor model.layers.1.mlp.experts.3.up_proj.weight is missing; expected shape \[32, 64\]"),
    ("unexpected", r"unexpected tensor model.layers.0.self_attn.extra.weight with shape \[2, 2\]"),
    ("misshaped", r"tensor model.layers.0.self_attn.o_proj.weight has shape \[64, 40\], expected \[64, 48\]"),
    ("corrupt", r"not a readable safetensors file"),
    ("pickle", r"routed never unpickles"),
    ("not_deepseek", r"field `model_type` is 'llama'"),
    ("no_folder", r"no such file or folder"),
])
def test_broken_checkpoints_raise_one_clear_error(ckpt, case: str, pattern: str) -> None:
    folder, _ = ckpt
    if case == "missing":
        _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    elif case == "unexpected":
        _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2, 2)}))
    elif case == "misshaped":
        _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 40)}))
    elif case == "corrupt":
        (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif case == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif case == "not_deepseek":
        edit_config(folder, model_type="llama")
    elif case == "no_folder":
        folder = folder / "nope"
    with pytest.raises(RoutedError, match=pattern):
        routed.load_model(folder, progress=False)


@pytest.mark.parametrize("telemetry", [True, False])
def test_the_load_compiles_the_decode_step_with_the_engines_routing_telemetry(
        tiny_preset: Path, telemetry: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers' counting is set before the load compiles the decode step, so an engine with telemetry off
    does not compile it a second time (`LLMEngine` recompiles when its setting differs from the routers')."""
    from routed.config import EngineConfig
    from routed.engine.engine import LLMEngine
    from routed.model import gemv
    from routed.model.deepseek_v3 import Transformer

    seen = []
    monkeypatch.setattr(gemv, "MIN_MODEL_BYTES", 0)  # tiny compiles too (stubbed below)
    monkeypatch.setattr(gemv, "enable", lambda: False)
    monkeypatch.setattr(Transformer, "compile_decode", lambda self, progress=False: seen.append(
        {gate.counting for _, gate in self.gates()}) or False)
    engine = LLMEngine.from_pretrained(tiny_preset, config=EngineConfig(routing_telemetry=telemetry), progress=False)
    assert seen == [{telemetry}]
    assert {gate.counting for _, gate in engine.model.gates()} == {telemetry}


def test_an_int4_load_compiles_the_prefills_widening_so_serving_compiles_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large int4 model's load compiles the widening of its weights for the prefill's GEMMs (`intq.enable_widen`,
    its group size, as the engine calls it: in inference mode, on the loader's tensors); a prefill then compiles
    nothing more, and its logits are the eager widening's, bitwise."""
    from routed.model import gemv
    from routed.model.deepseek_v3 import Transformer
    from routed.quant import intq

    folder, _ = make_checkpoint(tmp_path / "ckpt", hidden_size=128, moe_intermediate_size=64, intermediate_size=192,
                                q_lora_rank=64, num_hidden_layers=2)
    monkeypatch.setattr(gemv, "MIN_MODEL_BYTES", 0)  # as a large model: the loader compiles (the decode step: stubbed)
    monkeypatch.setattr(gemv, "enable", lambda: False)
    monkeypatch.setattr(Transformer, "compile_decode", lambda self, progress=False: False)
    monkeypatch.setitem(intq._WIDEN, "kernel", None)
    monkeypatch.setattr(intq, "DEQUANT_ROWS_INT4", 64)  # this model's experts see ~50 rows of 200 tokens
    model = routed.load_model(folder, torch.bfloat16, progress=False, quant="int4")
    assert intq._WIDEN["kernel"] is not None
    widened = []
    widen = intq.widen_int4
    monkeypatch.setattr(intq, "widen_int4", lambda *a: widened.append(a[0].shape) or widen(*a))
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(0))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model(ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert len(widened) > 4  # the projections, dense and shared MLPs, some experts
    monkeypatch.setitem(intq._WIDEN, "kernel", None)
    with torch.inference_mode():
        assert torch.equal(model(ids), compiled)
