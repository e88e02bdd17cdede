"""PPO's policy and critic trained side by side in two threads: the same update as one after the other."""

import copy
import threading

import pytest
import torch
from conftest import TINY_WORLD
from test_phases import ppo_models

from rlhf_core import world
from rlhf_core.config import PPOConfig
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import advantages_and_returns, collect_rollout, ppo_update
from rlhf_core.threads import side_by_side


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_side_by_side_runs_each_call_in_a_thread_of_its_own_on_half_the_threads(two_threads):
    seen, both_running = [], threading.Barrier(2, timeout=10)  # broken, and failing, unless the two overlap

    def record() -> str:
        name = threading.current_thread().name
        seen.append((name, torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        both_running.wait()
        return name

    with torch.no_grad(), side_by_side() as run:
        first, second = run(record, record)
    assert first != second and threading.current_thread().name not in (first, second)
    # the caller's grad and inference modes, half the threads
    assert [(threads, grad, inference) for _, threads, grad, inference in seen] == [(1, False, False)] * 2
    with torch.inference_mode(), side_by_side() as run:
        run(record, record)
    assert [(grad, inference) for _, _, grad, inference in seen[2:]] == [(False, True)] * 2
    assert torch.get_num_threads() == 2
    with side_by_side(enabled=False) as run:
        assert run(lambda: threading.current_thread().name) == (threading.current_thread().name,)


def fresh_models(sft_dir, config: PPOConfig):
    torch.manual_seed(0)  # the critic's fresh head
    return ppo_models(
        load_policy(sft_dir), load_scorer(sft_dir), load_policy(sft_dir).eval(), load_scorer(sft_dir).eval(), config
    )


def test_policy_and_critic_side_by_side_make_the_update_one_after_the_other_makes(sft_dir, two_threads):
    tokenizer = load_tokenizer(sft_dir)
    config = PPOConfig(rollout_batch_size=16, minibatch_size=4, epochs=2, lr=1e-3, max_new_tokens=8, target_kl=None)
    models = fresh_models(sft_dir, config)
    start = [copy.deepcopy(models.policy.module.state_dict()), copy.deepcopy(models.critic.module.state_dict())]
    rollout = collect_rollout(models, tokenizer, world.make_world(0, TINY_WORLD).ppo_prompts[:16], config)
    _, _, advantages, returns = advantages_and_returns(rollout, config, kl_coef=0.1)
    updated = {}
    for parallel in (False, True):
        models = fresh_models(sft_dir, config)
        stats = ppo_update(
            models,
            rollout,
            advantages=advantages,
            returns=returns,
            config=config.model_copy(update={"parallel_critic": parallel}),
            generator=torch.Generator().manual_seed(0),
        )
        updated[parallel] = (models.policy.module.state_dict(), models.critic.module.state_dict(), stats)
    for i, before in enumerate(start):
        one_after_another, beside = updated[False][i], updated[True][i]
        assert max((one_after_another[k] - before[k]).abs().max().item() for k in before) > 1e-4  # it trained
        # one intra-op thread instead of two changes only how a sum is split: rounding
        assert max((one_after_another[k] - beside[k]).abs().max().item() for k in before) < 1e-5
    sequential, parallel = updated[False][2], updated[True][2]
    assert sequential.keys() == parallel.keys()
    assert all(sequential[k] == pytest.approx(parallel[k], abs=1e-5) for k in sequential)


def test_reference_and_critic_side_by_side_score_a_rollout_as_one_after_the_other(sft_dir, two_threads):
    tokenizer, prompts = load_tokenizer(sft_dir), world.make_world(0, TINY_WORLD).ppo_prompts[:16]
    config = PPOConfig(rollout_batch_size=16, max_new_tokens=8)
    models = fresh_models(sft_dir, config)
    models.critic.module.eval()
    rollouts = {}
    for parallel in (False, True):
        torch.manual_seed(1)  # the same samples
        rollouts[parallel] = collect_rollout(
            models, tokenizer, prompts, config.model_copy(update={"parallel_critic": parallel}), pack=True
        )
    one_after_another, beside = rollouts[False], rollouts[True]
    assert torch.equal(one_after_another.samples.query_responses, beside.samples.query_responses)
    for name in ("ref_logprobs", "values"):
        assert torch.allclose(getattr(one_after_another, name), getattr(beside, name), atol=1e-5)


def test_a_phase_runs_on_the_configured_threads_in_its_own_thread() -> None:
    """compute.threads holds for the phase's body, in the worker thread Prefect runs it in, and is undone after."""
    from concurrent.futures import ThreadPoolExecutor

    from rlhf_core.config import ComputeConfig
    from tasks.common import phase_task

    @phase_task("probe")
    def probe(context: object, *, compute: ComputeConfig) -> int:
        return torch.get_num_threads()

    before = torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(probe.fn, None, compute=ComputeConfig(threads=1)).result() == 1
        assert pool.submit(probe.fn, None, compute=ComputeConfig(threads=3)).result() == 3
        assert (
            pool.submit(probe.fn, None, compute=ComputeConfig()).result() == pool.submit(torch.get_num_threads).result()
        )
    assert torch.get_num_threads() == before
