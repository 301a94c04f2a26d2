"""Optimizer in backward on the tiny SD-topology model, on CPU: the same update as the normal
path, gradients freed during backward, resume, and the settings it refuses. Nothing mocked.

Tolerance: none. On the CPU, torch.optim.AdamW over several tensors runs its single-tensor
kernel one tensor at a time, and the gradients are those of the same forward (no weight is
changed before every gradient that reads it has been computed), so both paths do the very
same float operations: results are compared bit for bit (rtol=0, atol=0). The one
exception is the logged gradient norm, summed in another order than clip_grad_norm_'s
(rel=1e-5). bitsandbytes' AdamW8bit is checked where it is installed and works.
"""
import copy
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from dbnb.core.config import Config, ConfigError
from dbnb.family.sd1.skeleton import TINY_TEXT, TINY_UNET, TINY_VAE, skeleton_config
from dbnb.train.inbackward import OptimizerInBackward, check_supported, unsupported_settings
from dbnb.world.tiny import build_components

ADAMW = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    unet, _, text_encoder = build_components(skeleton_config("unet", **TINY_UNET), skeleton_config("vae", **TINY_VAE),
                                             skeleton_config("text_encoder", **TINY_TEXT), seed=0)
    return unet, text_encoder


def fresh(tiny, checkpointing=False):
    unet, text_encoder = copy.deepcopy(tiny)
    unet.train(), text_encoder.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
        enable = getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)
        enable()
    return unet, text_encoder


def groups(unet, text_encoder):
    """What dbnb.train.optimizers.build builds with train_text_encoder on: two groups, two LRs."""
    return [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": 1e-3},
            {"params": list(text_encoder.parameters()), "lr": 5e-4}]


def schedule(optimizer):
    return get_scheduler("polynomial", optimizer, num_warmup_steps=1, num_training_steps=5)


def loss_at(unet, text_encoder, k):
    """The DreamBooth loss shape on seeded inputs: predict the noise from latents, timesteps
    and the text encoder's states (trained too, so its gradients flow through the UNet's)."""
    g = torch.Generator().manual_seed(1000 + k)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    ids = torch.randint(0, 49408, (2, 8), generator=g)
    pred = unet(latents + noise, timesteps, text_encoder(ids)[0]).sample
    return F.mse_loss(pred.float(), noise)


def train_step(models, optimizer, scheduler, k):
    """What dbnb.train.loop.optimizer_step does (less accelerate): backward, step, zero_grad, schedule."""
    loss_at(*models, k).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def params(models):
    return [p for m in models for p in m.parameters()]


def assert_same_weights(models, expected, msg=""):
    named = [(n, p) for m in models for n, p in m.named_parameters()]
    assert len(named) == len(expected)
    for (name, x), y in zip(named, expected):
        torch.testing.assert_close(x, y, **EXACT, msg=lambda m: f"{msg} {name}: {m}")


@pytest.fixture(scope="module")
def reference(tiny):
    """The normal path, 3 steps: weights and LRs after each, the global gradient norm of the
    first backward, and a resumable snapshot (weights, optimizer, schedule) after step 2."""
    models = fresh(tiny)
    opt = torch.optim.AdamW(groups(*models), **ADAMW)
    sched = schedule(opt)
    ref = SimpleNamespace(start=[p.detach().clone() for p in params(models)], weights=[], lrs=[])
    for k in range(3):
        ref.lrs.append(sched.get_last_lr())
        loss_at(*models, k).backward()
        if k == 0:
            ref.norm = float(torch.nn.utils.clip_grad_norm_(params(models), float("inf")))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ref.weights.append([p.detach().clone() for p in params(models)])
        if k == 1:
            ref.snapshot = (copy.deepcopy(models), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    ref.final_lrs = sched.get_last_lr()
    return ref


def in_backward(models, **kw):
    return OptimizerInBackward(groups(*models), torch.optim.AdamW, **kw, **ADAMW)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_same_update_and_lr_as_the_normal_path(tiny, reference, checkpointing):
    models = fresh(tiny, checkpointing)
    optimizer = in_backward(models)
    sched = schedule(optimizer)
    for k in range(3):
        assert sched.get_last_lr() == reference.lrs[k]
        train_step(models, optimizer, sched, k)
        assert_same_weights(models, reference.weights[k], f"step {k + 1}")
        # the LR each parameter was really stepped with is the schedule's, per group
        assert optimizer._inner[0].param_groups[0]["lr"] == reference.lrs[k][0]
        assert optimizer._inner[-1].param_groups[0]["lr"] == reference.lrs[k][1]
    assert sched.get_last_lr() == reference.final_lrs
    assert reference.lrs[0] == [0.0, 0.0] and reference.lrs[1] == [1e-3, 5e-4]  # warmup, then
    assert reference.lrs[2][0] < 1e-3  # decay
    moved = [not torch.equal(p, s) for p, s in zip(params(models), reference.start)]
    assert sum(moved) > 0.95 * len(moved)  # real updates are compared, not zeros


def test_gradients_are_freed_during_backward_and_step_zero_grad_are_no_ops(tiny, reference):
    models = fresh(tiny)
    optimizer = in_backward(models, track_grad_norm=True)
    everything, alive = params(models), []

    def watch(p):  # registered after the optimizer's hooks: runs right after p's own hook
        alive.append(sum(q.grad is not None for q in everything))
    handles = [p.register_post_accumulate_grad_hook(watch) for p in everything]
    loss_at(*models, 0).backward()
    for h in handles:
        h.remove()
    assert len(alive) == len(everything) and max(alive) == 0  # each gradient freed at once
    assert all(p.grad is None for p in everything)
    assert len(optimizer.state) == len(everything)  # every parameter stepped, once
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())
    assert optimizer.grad_norm is None  # known once step() has run, as the loop calls it
    after = [p.detach().clone() for p in everything]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(p, a) for p, a in zip(everything, after))
    # the global norm the normal path would clip by (summed in another order: float rounding)
    assert optimizer.grad_norm == pytest.approx(reference.norm, rel=1e-5)


def test_state_dict_round_trip_resumes_exactly(tiny, reference, tmp_path):
    first = fresh(tiny)
    optimizer = in_backward(first)
    sched = schedule(optimizer)
    for k in range(2):
        train_step(first, optimizer, sched, k)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sched.state_dict(), tmp_path / "lr_scheduler.pt")
    optimizer.remove()

    resumed = copy.deepcopy(first)  # the weights as a checkpoint restores them
    optimizer = in_backward(resumed)
    sched = schedule(optimizer)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(tmp_path / "lr_scheduler.pt", weights_only=True))
    assert sched.get_last_lr() == [g["lr"] for g in optimizer.param_groups] == reference.lrs[2]
    train_step(resumed, optimizer, sched, 2)
    assert_same_weights(resumed, reference.weights[2], "resumed in-backward")

    # The layout is torch.optim.AdamW's: the normal path resumes from it too.
    normal = copy.deepcopy(first)
    opt = torch.optim.AdamW(groups(*normal), **ADAMW)
    sched = schedule(opt)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(tmp_path / "lr_scheduler.pt", weights_only=True))
    train_step(normal, opt, sched, 2)
    assert_same_weights(normal, reference.weights[2], "normal path resumed from an in-backward state")


def test_a_normal_path_checkpoint_resumes_in_backward(reference):
    models, opt_state, sched_state = copy.deepcopy(reference.snapshot)
    optimizer = in_backward(models)
    sched = schedule(optimizer)
    optimizer.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    train_step(models, optimizer, sched, 2)
    assert_same_weights(models, reference.weights[2], "in-backward resumed from a normal-path state")


def test_through_accelerate_as_the_trainer_would_use_it(tiny, reference):
    """The recommended integration: models through accelerator.prepare, the optimizer not;
    accelerate's accumulate/backward, then the loop's own step / zero_grad / schedule calls."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=1)
    try:
        unet, text_encoder = fresh(tiny)
        optimizer = in_backward((unet, text_encoder))  # built before prepare, as in dbnb.train.loop.setup
        sched = schedule(optimizer)
        unet, text_encoder = accelerator.prepare(unet, text_encoder)
        for k in range(2):
            with accelerator.accumulate(unet):
                accelerator.backward(loss_at(unet, text_encoder, k))
                assert accelerator.sync_gradients
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sched.step()
        assert_same_weights((unet, text_encoder), reference.weights[1], "through accelerate")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_load_state_dict_refuses_another_model(tiny):
    models = fresh(tiny)
    saved = in_backward(models).state_dict()
    other = OptimizerInBackward([{"params": list(fresh(tiny)[0].parameters()), "lr": 1e-3}], **ADAMW)
    with pytest.raises(ValueError, match="not the same model"):
        other.load_state_dict(saved)


def test_remove_drops_the_hooks(tiny):
    models = fresh(tiny)
    in_backward(models).remove()
    before = [p.detach().clone() for p in params(models)]
    loss_at(*models, 0).backward()
    assert all(p.grad is not None for p in params(models))
    assert all(torch.equal(p, b) for p, b in zip(params(models), before))


def test_any_optimizer_factory_works(tiny):
    """`make` is any `make(param_groups, **kwargs)`: here SGD with momentum, bit for bit too."""
    make = functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-2)
    normal, inback = fresh(tiny), fresh(tiny)
    opt = make(groups(*normal))
    loss_at(*normal, 0).backward()
    opt.step()
    OptimizerInBackward(groups(*inback), make)
    loss_at(*inback, 0).backward()
    assert_same_weights(inback, params(normal), "sgd")


def test_a_parameter_listed_twice_is_refused(tiny):
    unet = fresh(tiny)[0]
    p = next(unet.parameters())
    with pytest.raises(ValueError, match="listed twice"), pytest.warns(UserWarning, match="duplicate"):
        OptimizerInBackward([{"params": [p, p], "lr": 1e-3}])


@pytest.mark.parametrize("setting, change, processes", [
    ("gradient_accumulation_steps", dict(gradient_accumulation_steps=4), 1),
    ("max_grad_norm", dict(max_grad_norm=1.0), 1),
    ("mixed_precision=fp16", dict(mixed_precision="fp16"), 1),
    ("2 processes", {}, 2),
])
def test_check_supported_refuses_each_excluded_setting(setting, change, processes):
    ok = Config(max_grad_norm=0.0, mixed_precision="bf16", gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match=setting) as e:
        check_supported(ok.replace(**change), processes)
    assert isinstance(e.value, ValueError)
    assert "optimizer_in_backward=false" in str(e.value)
    assert len(unsupported_settings(ok.replace(**change), processes)) == 1


def test_check_supported_accepts_bf16_and_no_and_lists_every_problem():
    for precision in ("bf16", "no"):
        assert check_supported(Config(max_grad_norm=0.0, mixed_precision=precision), 1) is None
    with pytest.raises(ConfigError) as e:
        check_supported(Config(), 1)  # the defaults: fp16 and max_grad_norm=1.0
    assert "max_grad_norm=1" in str(e.value) and "mixed_precision=fp16" in str(e.value)
    assert "Set max_grad_norm=0" in str(e.value) and "mixed_precision=bf16" in str(e.value)


def _bitsandbytes():
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception as e:  # noqa: BLE001 — not installed, or installed without a working backend
        pytest.skip(f"bitsandbytes not usable here: {e}")


def test_bitsandbytes_adamw8bit_same_update_and_resume(tiny, tmp_path):
    """The trainer's default optimizer (use_8bit_adam), where bitsandbytes runs (0.50 does on CPU)."""
    bnb = _bitsandbytes()
    make = bnb.optim.AdamW8bit
    normal, inback = fresh(tiny), fresh(tiny)
    opt_a = make(groups(*normal), **ADAMW)
    opt_b = OptimizerInBackward(groups(*inback), make, **ADAMW)
    sched_a, sched_b = schedule(opt_a), schedule(opt_b)
    for k in range(2):
        train_step(normal, opt_a, sched_a, k)
        train_step(inback, opt_b, sched_b, k)
    assert_same_weights(inback, params(normal), "AdamW8bit")
    assert any(s["state1"].dtype == torch.uint8 for s in opt_b.state.values())  # really 8-bit states
    torch.save(opt_b.state_dict(), tmp_path / "optimizer.pt")
    opt_b.remove()
    resumed = copy.deepcopy(inback)
    opt_c = OptimizerInBackward(groups(*resumed), make, **ADAMW)
    sched_c = schedule(opt_c)
    opt_c.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    sched_c.load_state_dict(sched_b.state_dict())
    train_step(normal, opt_a, sched_a, 2)
    train_step(resumed, opt_c, sched_c, 2)
    assert_same_weights(resumed, params(normal), "AdamW8bit resumed")


def test_the_config_refuses_optimizer_in_backward_with_what_it_cannot_combine_at_once():
    # the form validates through from_dict: the refusal comes when the setting is typed, not at training
    from dbnb.core.config import from_dict

    with pytest.raises(ConfigError) as e:
        from_dict({"optimizer_in_backward": True})  # the defaults: fp16 and max_grad_norm=1.0
    assert "max_grad_norm=1" in str(e.value) and "mixed_precision=fp16" in str(e.value)
    assert "optimizer_in_backward=false" in str(e.value)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2"):
        from_dict({"optimizer_in_backward": True, "max_grad_norm": 0.0, "mixed_precision": "bf16",
                   "gradient_accumulation_steps": 2})
    assert from_dict({"optimizer_in_backward": True, "max_grad_norm": 0.0, "mixed_precision": "bf16"})
    # auto picks the precision from the GPU at training, where dbnb.train.memory refuses fp16
    assert from_dict({"optimizer_in_backward": True, "max_grad_norm": 0.0, "memory_profile": "auto"})
