"""Half precision on the CPU (issue 29, item 10): the full and LoRA paths under bf16 autocast
and fp16 autocast with a real loss scaler, through the real trainer and config, so the GPU
run's dtype plumbing, the GradScaler's skipped steps and LoRA on a half-precision base run in CI."""
import json
import math

import pytest
import torch

from dbnb.family import lora
from dbnb.train.loop import train


@pytest.fixture
def make_config(make_config):
    """conftest's tiny run, under bf16 autocast unless told otherwise."""
    return lambda **overrides: make_config(**{"mixed_precision": "bf16", **overrides})


@pytest.fixture
def watch(monkeypatch):
    """`watch(at_start)`: calls at_start(session) as the real loop starts; returns what it noted.
    A forward hook notes the dtype a UNet linear layer computes in (autocast's, not the weights')."""
    from dbnb.train import loop as train_module

    real, noted = train_module.loop, {"matmul": set()}

    def install(at_start=None):
        def loop(s, *args, **kwargs):
            noted["session"] = s
            layer = next(m for m in s.accelerator.unwrap_model(s.denoiser).modules() if isinstance(m, torch.nn.Linear))
            layer.register_forward_hook(lambda m, inputs, out: noted["matmul"].add(out.dtype))
            if at_start:
                at_start(s)
            return real(s, *args, **kwargs)
        monkeypatch.setattr(train_module, "loop", loop)
        return noted
    return install


@pytest.fixture
def loss_scaler(monkeypatch):
    """A real torch.amp.GradScaler on the CPU, given to the Accelerator as accelerate gives one to
    an fp16 run on a GPU (on a CPU it gives none), with the autocast accelerate then uses. For
    fp16, check_machine sees the CUDA device that run has (on a CPU it refuses fp16)."""
    import accelerate

    from dbnb.train import loop as train_module

    real_init, real_check, scalers = accelerate.Accelerator.__init__, train_module.check_machine, []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        scalers.append(self.scaler)
    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)
    monkeypatch.setattr(train_module, "check_machine",
                        lambda config, device: real_check(config, torch.device("cuda"))
                        if config.mixed_precision == "fp16" else real_check(config, device))
    return scalers


def _log(result):
    return [json.loads(x) for x in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]


def test_full_fine_tuning_under_bf16_autocast(make_config, watch):
    noted = watch()
    config = make_config(use_ema=True, max_grad_norm=1.0, with_prior_preservation=True, num_class_images=6,
                         save_every_steps=2, sample_every_steps=4, num_samples=1, sample_steps=2)
    result = train(config, progress=False)
    s = noted["session"]
    assert result.step == 4 and [r["step"] for r in _log(result)] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in _log(result))
    assert noted["matmul"] == {torch.bfloat16}  # the UNet computed under autocast
    assert {p.dtype for p in s.denoiser.parameters()} == {torch.float32}  # fp32 master weights
    assert {p.dtype for p in s.encoder.parameters()} == {torch.bfloat16}  # frozen: in the run's dtype
    assert {p.dtype for p in s.ema.shadow_params} == {torch.float32}
    assert (result.run_dir / "samples").is_dir() and any((result.run_dir / "samples").rglob("*.png"))
    assert [p.name for p in result.checkpoints] == ["step-000002", "step-000004"]


def test_lora_on_a_bf16_base_trains_fp32_adapters(make_config, watch):
    start = {}
    noted = watch(lambda s: start.update({n: p.detach().clone() for n, p in s.denoiser.named_parameters()
                                          if p.requires_grad}))
    result = train(make_config(use_lora=True, lora_rank=4, lora_text_encoder_rank=4, use_ema=True,
                               cache_latents=False, max_train_steps=3, save_every_steps=3), progress=False)
    s = noted["session"]
    unet = s.accelerator.unwrap_model(s.denoiser)
    adapters = lora.trainable(unet, s.accelerator.unwrap_model(s.encoder))
    assert adapters and {p.dtype for p in adapters} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base
    assert noted["matmul"] == {torch.bfloat16}
    now = dict(unet.named_parameters())
    assert any(not torch.equal(now[n], before) for n, before in start.items())  # the adapters learnt
    assert all(math.isfinite(r["loss"]) for r in _log(result)) and result.checkpoints


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_the_loss_scaler_skips_a_step_whose_gradients_overflow(make_config, watch, loss_scaler, precision,
                                                               max_grad_norm):
    """An inf gradient at step 3 (a hook on one UNet weight, as an fp16 overflow gives): the
    scaler finds it, skips that optimizer step and halves its scale; the run goes on."""
    weights, calls = {}, []

    def inject(s):
        def overflow(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 3 else grad
        next(p for p in s.accelerator.unwrap_model(s.denoiser).parameters() if p.requires_grad).register_hook(overflow)

    noted = watch(inject)

    def keep(record):  # the weights in memory after each step
        weights[record["step"]] = [p.detach().clone() for p in noted["session"].denoiser.parameters() if p.requires_grad]
    extra = dict(use_lora=True, lora_rank=4) if precision == "fp16" else {}
    result = train(make_config(mixed_precision=precision, max_grad_norm=max_grad_norm, **extra), progress=False,
                   on_step=keep)
    assert result.step == 4 and not result.cancelled
    assert noted["matmul"] == {torch.bfloat16 if precision == "bf16" else torch.float16}
    scaler = loss_scaler[0]
    assert scaler.get_scale() == 2.0 ** 11  # halved once, by the overflow
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(weights[a], weights[b]))  # noqa: E731
    assert same(2, 3) and not same(1, 2) and not same(3, 4)  # step 3 skipped, the others applied
    norms = [r["grad_norm"] for r in _log(result)]
    if max_grad_norm:  # measured where clipping unscales; inf is routine under a scaler
        assert math.isinf(norms[2]) and all(math.isfinite(n) for n in norms[:2] + norms[3:])
    else:
        assert norms == [None] * 4
