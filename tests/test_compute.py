"""The ``compute`` section on tiny real Llamas: gradient checkpointing recomputes each layer and changes no loss or
gradient (LoRA and DeepSpeed too) while sampling keeps its KV cache; bf16 autocast runs the matmuls in bf16, weights
and AdamW state staying fp32, in every forward a phase makes (generate through peft, a scorer's base model); fp16
scales its loss and its scaler resumes; the attention kernel reaches the models; the config refuses what cannot run,
naming the fields; and SFT and a LoRA PPO phase run end to end with both on."""

import copy
import importlib.util
import io
import json
import typing

import pytest
import torch
from conftest import TINY_WORLD
from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python
from test_flow import TINY

from flows.config import ConfigError, load_config
from infra.artifacts import PhaseInputs
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core import world
from rlhf_core.config import ComputeConfig, LoRAConfig
from rlhf_core.engine import Optimization, TorchEngine, autocast_dtype, autocast_model
from rlhf_core.lora import add_lora
from rlhf_core.modeling import (
    EncodedPairs,
    enable_gradient_checkpointing,
    encode_prompt_responses,
    load_policy,
    load_scorer,
    load_tokenizer,
    sample_responses,
    token_scores,
)
from rlhf_core.sft import sft_loss
from tasks.common import frozen_policy, make_engine, phase_key
from tasks.data import write_data
from tasks.ppo import run_ppo
from tasks.sft import run_sft


def demonstration_batch(tokenizer, n: int = 16) -> EncodedPairs:
    demonstrations = world.make_world(0, TINY_WORLD).demonstrations[:n]
    return encode_prompt_responses(tokenizer, [p for p, _ in demonstrations], [r for _, r in demonstrations], 48)


def loss_and_grads(model: torch.nn.Module, batch: EncodedPairs) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = sft_loss(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def count_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one each time ``module`` starts a forward (a pre-hook: a recompute stops as soon as it
    has every activation the backward needs, so a hook at the end of the module's forward may not fire in it)."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def dtypes_seen(module: torch.nn.Module) -> list[torch.dtype]:
    """The dtypes of ``module``'s outputs, one per forward."""
    dtypes: list[torch.dtype] = []
    module.register_forward_hook(lambda _m, _i, output: dtypes.append(output.dtype))
    return dtypes


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_each_layer_and_changes_no_gradient(sft_dir, lora):
    tokenizer, batch = load_tokenizer(sft_dir), demonstration_batch(load_tokenizer(sft_dir))

    def policy() -> torch.nn.Module:
        torch.manual_seed(0)  # the same fresh adapters
        model = load_policy(sft_dir)
        return add_lora(model, LoRAConfig(r=4)) if lora else model

    plain, recomputed = policy(), enable_gradient_checkpointing(policy())
    inner = recomputed.get_base_model() if lora else recomputed
    assert (
        inner.is_activation_checkpointing
        and not (plain.get_base_model() if lora else plain).is_activation_checkpointing
    )
    calls = count_calls(inner.model.layers[0].mlp)
    loss, grads = loss_and_grads(plain, batch)
    loss_recomputed, grads_recomputed = loss_and_grads(recomputed, batch)
    assert len(calls) == 2  # the forward, then its recompute in the backward
    # measured on CPU (models built with seeds 0-3, full and LoRA): bitwise the same loss and gradients
    assert loss_recomputed == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_recomputed.keys() and (len(grads) < 40 if lora else len(grads) > 10)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_recomputed[name], grad, atol=1e-6, rtol=0, msg=name)
    # sampling (eval mode) keeps the KV cache: after the prompt, one new token per forward
    widths: list[int] = []
    inner.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: widths.append(inputs[0].shape[1]))
    sample_responses(recomputed.eval(), tokenizer, ["explain briefly ocean :"] * 2, max_new_tokens=5)
    assert widths[0] > 1 and set(widths[1:]) == {1}, widths
    calls.clear()
    with torch.no_grad():  # and no recompute without a backward
        recomputed.train()(input_ids=batch.input_ids)
    assert len(calls) == 1


def test_gradient_checkpointing_under_deepspeed_changes_no_step(sft_dir):
    batch = demonstration_batch(load_tokenizer(sft_dir))
    steps = []
    for on in (False, True):
        engine = make_engine(
            load_policy(sft_dir),
            Optimization(lr=1e-3, total_steps=2),
            DeepSpeedConfig(zero_stage=2),
            16,
            compute=ComputeConfig(gradient_checkpointing=on),
        )
        assert engine.module.is_activation_checkpointing == on
        engine.module.train()
        losses = []
        for _ in range(2):
            loss = sft_loss(engine.module, batch)
            engine.backward(loss)
            losses += [loss.item(), engine.step()["grad_norm"]]
        steps.append(losses)
    assert steps[1] == pytest.approx(steps[0], abs=1e-6)  # measured: the same to the last bit on CPU


def test_bf16_autocast_runs_every_forward_in_bf16_and_keeps_fp32_weights_and_state(sft_dir):
    tokenizer, batch = load_tokenizer(sft_dir), demonstration_batch(load_tokenizer(sft_dir))
    fp32_loss = sft_loss(load_policy(sft_dir), batch).item()
    engine = TorchEngine(load_policy(sft_dir), Optimization(lr=1e-3, total_steps=4), autocast="bf16")
    model = engine.module.train()
    dtypes = dtypes_seen(model.model.layers[0].mlp.down_proj)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert dtypes == [torch.bfloat16] and out.logits.dtype == torch.float32  # log-softmax in fp32
    loss = sft_loss(model, batch)
    # measured on ten batches of this model: at most 2.2e-4 nats from fp32's (a loss of about 4.5; fp16: 4e-5)
    assert loss.item() == pytest.approx(fp32_loss, abs=2e-3)
    engine.backward(loss)
    update = engine.step()
    assert "loss_scale" not in update  # bf16 needs no loss scaling
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = [t for s in engine.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert state and {t.dtype for t in state} == {torch.float32}
    # sampling goes through the same forward
    dtypes.clear()
    samples = sample_responses(
        model.eval(), tokenizer, ["explain briefly ocean :"], max_new_tokens=3, with_logprobs=True
    )
    assert set(dtypes) == {torch.bfloat16} and samples.logprobs.dtype == torch.float32


def test_autocast_reaches_generate_through_peft_and_a_scorers_base_model(sft_dir):
    tokenizer = load_tokenizer(sft_dir)
    policy = TorchEngine(
        add_lora(load_policy(sft_dir), LoRAConfig(r=4)), Optimization(lr=1e-3, total_steps=1), autocast="bf16"
    ).module
    dtypes = dtypes_seen(policy.get_base_model().model.layers[0].mlp.down_proj.base_layer)
    sample_responses(policy.eval(), tokenizer, ["explain briefly ocean :"], max_new_tokens=3)  # peft's generate
    assert dtypes and set(dtypes) == {torch.bfloat16}
    scorer = autocast_model(load_scorer(sft_dir).eval(), "bf16", torch.device("cpu"))  # a frozen reward model
    dtypes = dtypes_seen(scorer.model.layers[0].mlp.down_proj)
    batch = demonstration_batch(tokenizer, 4)
    scores = token_scores(scorer, batch.input_ids, batch.attention_mask)
    assert dtypes == [torch.bfloat16] and scores.dtype == torch.float32
    autocast_model(scorer, "fp16", torch.device("cpu"))  # wrapping again replaces, does not nest
    dtypes.clear()
    token_scores(scorer, batch.input_ids, batch.attention_mask)
    assert dtypes == [torch.float16]
    copied = copy.deepcopy(scorer)  # a copy runs its own weights (here: a final norm of zeros), still in fp16
    torch.nn.init.zeros_(copied.model.norm.weight)
    dtypes.clear()  # the copy's hooks are copies of the original's, which append here
    assert token_scores(copied, batch.input_ids, batch.attention_mask).eq(0).all()
    assert dtypes == [torch.float16] and token_scores(scorer, batch.input_ids, batch.attention_mask).ne(0).any()


def test_fp16_autocast_scales_its_loss_and_its_scaler_resumes(sft_dir):
    batch = demonstration_batch(load_tokenizer(sft_dir))

    def engine() -> TorchEngine:
        return TorchEngine(load_policy(sft_dir), Optimization(lr=1e-3, total_steps=4), autocast="fp16")

    first = engine()
    dtypes = dtypes_seen(first.module.model.layers[0].mlp.down_proj)
    first.module.train()
    for _ in range(3):
        first.backward(sft_loss(first.module, batch))
        update = first.step()
        assert update["loss_scale"] > 0
    assert set(dtypes) == {torch.float16} and {p.dtype for p in first.module.parameters()} == {torch.float32}
    state = first.state_dict()
    fresh = engine()
    assert state["scaler"] != fresh.state_dict()["scaler"]  # three steps moved the scale or its growth tracker
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a resumable checkpoint stores it
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state_dict()["scaler"] == state["scaler"]
    assert fresh.scaler.get_scale() == first.scaler.get_scale()


def test_attn_implementation_reaches_the_models(sft_dir):
    compute = load_config(None, ["compute.attn_implementation=eager"]).compute
    assert frozen_policy(sft_dir, False, compute).config._attn_implementation == "eager"
    assert load_scorer(sft_dir, attn_implementation="eager").config._attn_implementation == "eager"
    assert load_policy(sft_dir).config._attn_implementation == "sdpa"  # the default


def test_the_config_refuses_what_cannot_run_by_name(monkeypatch):
    assert importlib.util.find_spec("flash_attn") is None  # not installed here
    with pytest.raises(ConfigError, match="compute.attn_implementation: .*flash_attention_2 needs the flash-attn"):
        load_config(None, ["compute.attn_implementation=flash_attention_2", "compute.autocast=bf16"])
    with pytest.raises(ConfigError, match="compute.autocast=bf16 with deepspeed is refused: .*deepspeed.precision"):
        load_config(None, ["compute.autocast=bf16", "deepspeed={zero_stage: 2}"])
    with pytest.raises(ConfigError, match="compute.autocast: Input should be 'off', 'bf16' or 'fp16'"):
        load_config(None, ["compute.autocast=fp8"])
    config = load_config(None, ["compute.gradient_checkpointing=true", "deepspeed={zero_stage: 3, precision: bf16}"])
    assert config.compute.gradient_checkpointing and config.compute.autocast == "off"
    # on a GPU without bf16 (pre-Ampere), the phase stops at its first model, naming the field
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ValueError, match=r"compute.autocast=bf16: this GPU \(Tesla V100\) has no bf16 support"):
        autocast_dtype("bf16", torch.device("cuda"))
    assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("off", torch.device("cuda")) is None
    # where flash-attn is installed: it runs in half precision only, and not with DeepSpeed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a)
    )
    assert load_config(None, ["compute.attn_implementation=flash_attention_2", "compute.autocast=bf16"])
    with pytest.raises(ConfigError, match="flash_attention_2 runs in bf16 or fp16 only: set compute.autocast"):
        load_config(None, ["compute.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="compute.attn_implementation flash_attention_2 with deepspeed"):
        load_config(None, ["compute.attn_implementation=flash_attention_2", "deepspeed={precision: bf16}"])


def test_only_the_precision_is_part_of_the_cache_key():
    def key(**compute) -> str:
        return phase_key("sft", {"seed": 0, "compute": ComputeConfig(**compute)})

    assert key(autocast="bf16") != key() != key(autocast="fp16")
    assert key(gradient_checkpointing=True, attn_implementation="eager") == key()


def test_the_compute_config_survives_the_json_trip_to_the_ranks():
    """A rank gets its arguments as JSON, validated against the entry's signature (tasks/launch.py)."""
    compute = ComputeConfig(autocast="fp16", gradient_checkpointing=True, attn_implementation="eager")
    for entry in (run_sft, run_ppo):
        hint = typing.get_type_hints(entry)["compute"]
        sent = json.loads(json.dumps(to_jsonable_python({"compute": compute})))
        assert TypeAdapter(hint).validate_python(sent["compute"]) == compute


def test_sft_and_a_lora_ppo_phase_run_with_bf16_autocast_and_gradient_checkpointing(tmp_path):
    config = load_config(
        None,
        [*TINY, "compute.autocast=bf16", "compute.gradient_checkpointing=true", "ppo.lora={r: 4}", "ppo.steps=2"],
    )
    data = tmp_path / "data"
    write_data(data, 0, config.data)
    sft = run_sft(data / "base_model", data, tmp_path / "sft", config=config.sft, seed=0, compute=config.compute)
    assert sft["final_loss"] < sft["first_loss"]
    torch.manual_seed(0)
    load_scorer(tmp_path / "sft").save_pretrained(tmp_path / "rm")
    load_tokenizer(tmp_path / "sft").save_pretrained(tmp_path / "rm")
    inputs = PhaseInputs(data, tmp_path / "sft", tmp_path / "sft", tmp_path / "rm")
    metrics = run_ppo(inputs, tmp_path / "ppo", config=config.ppo, seed=1, compute=config.compute)
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("policy_loss", "value_loss", "kl", "reward"))
    assert abs(metrics["kl"]) < 1.0  # the first steps stay near the reference, both run in bf16
    policy = load_policy(tmp_path / "ppo")  # the merged export: a plain fp32 causal LM
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
