"""routed.train: balance rules by hand, losses that fall, checkpoints that load in routed and transformers."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch

import routed
from routed.errors import RoutedError
from routed.model.deepseek_v3 import Transformer
from routed.train import TrainConfig, train, train_bpe
from routed.train.balance import RouterTap, fp32_routers, sequence_balance_loss, update_bias
from routed.train.bpe import BOS, EOS
from routed.train.fast import use_training_experts
from routed.train.trainer import build_model, init_weights

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 256, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
FAST = dict(seq_len=32, batch=8, lr=3e-3, warmup=5, eval_every=1000, save_every=1000, log_every=1000,
            val_tokens=512, vocab_size=512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few standard-library modules (present on every machine) as a small corpus folder."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
                 "textwrap.py", "colorsys.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py"):
        (folder / name.replace("/", "_")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """30 steps of the tiny model (fp32 checkpoint), with the bias update, the balance loss and MTP on."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(steps=30, gamma=1e-3, alpha=1e-3, mtp_lambda=0.3, dtype="fp32", save_dtype="fp32",
                      val_every=4, **FAST)
    train(out, cfg, model_config=TINY, data=corpus, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rows if "eval" not in r]


# ---- balance rules ----------------------------------------------------------------------------------------
def test_bias_update_moves_each_expert_by_gamma_toward_the_mean() -> None:
    bias = torch.tensor([0.5, 0.0, -0.2, 0.1])
    counts = torch.tensor([10, 0, 5, 5])  # mean 5: expert 0 over-loaded, 1 under-loaded, 2 and 3 exactly average
    update_bias(bias, counts, gamma=0.01)
    assert torch.allclose(bias, torch.tensor([0.49, 0.01, -0.2, 0.1]))
    update_bias(bias, counts, gamma=0.0)
    assert torch.allclose(bias, torch.tensor([0.49, 0.01, -0.2, 0.1]))


def test_sequence_balance_loss_equals_hand_computation() -> None:
    logits = torch.tensor([[[0.0, 1.0, -1.0, 2.0], [1.5, -0.5, 0.5, 0.0], [0.2, 0.3, -2.0, 1.0]]])  # B=1 T=3 E=4
    topk = torch.tensor([[[3, 1], [0, 2], [3, 1]]])  # K=2
    E, K, T = 4, 2, 3
    s = [[1 / (1 + torch.exp(-v)).item() for v in row] for row in logits[0]]
    s_norm = [[v / sum(row) for v in row] for row in s]
    expected = 0.0
    for i in range(E):
        f_i = E / (K * T) * sum(i in topk[0, t].tolist() for t in range(T))
        P_i = sum(s_norm[t][i] for t in range(T)) / T
        expected += f_i * P_i
    got = sequence_balance_loss(logits, topk)
    assert abs(got.item() - expected) < 1e-6
    # two sequences: the mean of each one's loss, not the loss of the pooled tokens
    two = sequence_balance_loss(torch.cat([logits, logits.flip(1)]), torch.cat([topk, topk]))
    other = sequence_balance_loss(logits.flip(1), topk)
    assert abs(two.item() - (got.item() + other.item()) / 2) < 1e-6


def test_balance_loss_has_gradient_through_router_logits_only() -> None:
    logits = torch.randn(2, 5, 8, requires_grad=True)
    loss = sequence_balance_loss(logits, torch.randint(0, 8, (2, 5, 2)))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bf16_autocast_keeps_router_logits_fp32() -> None:
    model = build_model(TINY)
    init_weights(model, 0.02, 0)
    fp32_routers(model)
    tap = RouterTap.attach(model)
    tap.recording = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_hidden(torch.randint(0, 512, (2, 16)))
    assert tap.records and all(r.logits_NE.dtype == torch.float32 for r in tap.records)
    assert all(r.logits_NE.requires_grad for r in tap.records)


def test_training_experts_equal_inference_experts() -> None:
    model = build_model(TINY)
    init_weights(model, 0.05, 1)
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        fast = model(x)
        plain = Transformer(model.config, torch.float32, with_mtp=True)
        plain.load_state_dict(model.state_dict())
        plain.set_impl(attn="naive")
        reference = plain(x)
    assert torch.equal(fast, reference)


# ---- training ----------------------------------------------------------------------------------------------
def test_losses_decrease_over_30_steps(run: tuple[Path, list[dict]]) -> None:
    _, rows = run
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[:5], rows[-5:]
    for key in ("main", "mtp", "loss"):
        before = sum(r[key] for r in first) / 5
        after = sum(r[key] for r in last) / 5
        assert after < before - 0.5, (key, before, after)
    assert all(r["balance"] > 0 for r in rows)  # recorded (alpha > 0)


def test_mtp_forward_shapes_and_logits() -> None:
    model = build_model(TINY)
    init_weights(model, 0.02, 0)
    x = torch.randint(0, 512, (3, 20))
    h = model.forward_hidden(x)
    h_mtp = model.forward_mtp(h[:, :-1], x[:, 1:])
    assert h.shape == (3, 20, 64) and h_mtp.shape == (3, 19, 64)
    assert model.logits(h_mtp).shape == (3, 19, 512)
    h_mtp.sum().backward()
    assert model.mtp[0].eh_proj.weight.grad is not None
    assert model.model.embed_tokens.weight.grad is not None  # the embedding is shared with the main model


def test_checkpoint_matches_transformers_and_loads_in_routed(run: tuple[Path, list[dict]]) -> None:
    out, _ = run
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_nextn_predict_layers"] == 1
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(reference, transformers.DeepseekV3ForCausalLM)
    model = routed.load_model(out, torch.float32, progress=False)
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x).logits
        got = model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the trained correction bias was saved
    with_mtp = routed.load_model(out, torch.float32, mtp=True, progress=False)
    assert len(with_mtp.mtp) == 1
    llm = routed.LLM(out, dtype="fp32", progress=False)
    text = llm.generate("def ", routed.SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(text.token_ids) == 4


def test_checkpoint_names_are_deepseeks(run: tuple[Path, list[dict]]) -> None:
    from safetensors import safe_open

    from routed.config import ModelConfig
    from routed.presets import expected_tensors

    out, _ = run
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
    assert names == set(expected_tensors(ModelConfig.from_pretrained(out), with_mtp=True))


def test_resume_continues_step_count_and_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    common = dict(FAST, warmup=0, min_lr_ratio=1.0, dtype="fp32", save_dtype="fp32", val_every=4)
    straight = train(tmp_path / "a", TrainConfig(steps=8, **common), model_config=TINY, data=corpus, progress=False)
    train(tmp_path / "b", TrainConfig(steps=5, **common), model_config=TINY, data=corpus, progress=False)
    resumed = train(tmp_path / "b", TrainConfig(steps=8, **common), resume=True, overrides={"steps": 8},
                    progress=False)
    assert resumed.step == 8 and json.loads((tmp_path / "b" / "training_state.json").read_text())["step"] == 8
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "eval" not in x]
    assert steps == list(range(1, 9))
    a = routed.load_model(tmp_path / "a", torch.float32, progress=False).state_dict()
    b = routed.load_model(tmp_path / "b", torch.float32, progress=False).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert abs(straight.val["loss"] - resumed.val["loss"]) < 1e-5


def test_new_run_refuses_a_used_folder_and_resume_needs_a_run(corpus: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=1, **dict(FAST, val_every=4))
    train(tmp_path / "a", cfg, model_config=TINY, data=corpus, progress=False)
    with pytest.raises(RoutedError, match="--resume"):
        train(tmp_path / "a", cfg, model_config=TINY, data=corpus, progress=False)
    with pytest.raises(RoutedError, match="no training run"):
        train(tmp_path / "empty", cfg, resume=True, progress=False)
    with pytest.raises(RoutedError, match="not a preset"):
        train(tmp_path / "c", cfg, model_config="no-such-preset", data=corpus, progress=False)


# ---- tokenizer ---------------------------------------------------------------------------------------------
def test_trained_tokenizer_round_trips_and_loads_in_transformers(corpus: Path, tmp_path: Path) -> None:
    from routed.tokenizer import Tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir())]
    assert train_bpe(texts, 600, tmp_path) == 600
    tok = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1) and len(hf) == 600
    samples = ["def f(x):\n    return x ** 2  # square\n", "numbers 1234567 and ünïcödé 你好 🙂",
               "   \n\n\tspaces", f"{BOS}<｜User｜>hi<｜Assistant｜>yo{EOS}"]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert hf.encode(text) == ids and hf.decode(ids) == text
    assert tok.token_to_id("<｜User｜>") is not None and len(tok.encode("<｜User｜>")) == 1
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(chat) == f"{BOS}<｜User｜>hi<｜Assistant｜>"


def test_demo_preset_fits_the_size_budget() -> None:
    from routed.config import ModelConfig
    from routed.presets import PRESETS, expected_tensors

    cfg = ModelConfig.from_dict(PRESETS["demo"])
    assert cfg.num_nextn_predict_layers == 1 and cfg.has_correction_bias and cfg.n_group > 1
    params = sum(torch.Size(s).numel() for s in expected_tensors(cfg, with_mtp=True).values())
    assert params * 2 < 24e6


def test_bundled_demo_model_loads_and_is_small() -> None:
    folder = Path(routed.__file__).parent / "demo_model"
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert sum(files.values()) <= 25_000_000
    model = routed.load_model(folder, torch.bfloat16, mtp=True, progress=False)
    assert len(model.mtp) == 1
