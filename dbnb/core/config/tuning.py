"""How the trainer runs: batch, memory savers, precision, optimizer, EMA, noise, seed, gradients, previews."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import FEW_PREVIEWS, QUALITY_NEGATIVE, setting


@dataclass(frozen=True)
class TuningSettings:
    """How the trainer steps (notebook 04): batch, memory and precision, the optimizer, gradients and
    the previews during training. Frozen with a run (a resume may still change those that do not
    change what it learns, marked learns=False)."""

    # --- Tuning --------------------------------------------------------------------------
    train_batch_size: int = setting(1, "Tuning", "Batch Size", "Images per step (per GPU).",
                                    help_ja="1 ステップあたりの画像の枚数（GPU ごと）。", minimum=1, memory_saving=1, report="always")
    memory_profile: str = setting(
        "manual", "Tuning", "Performance Wizard",
        "manual: mixed_precision, use_8bit_adam and gradient_checkpointing as set here. auto: training sets "
        "those three at its start to the fastest combination that fits the GPU by dbnb's prediction of the run's "
        "peak VRAM (`dbnb plan CONFIG`, dbnb/train/planner.py: the training step traced without weights) and "
        "prints what it chose; bf16 where the GPU has it; no GPU: fp32.",
        choices=("manual", "auto"),
        help_ja="manual: mixed_precision・use_8bit_adam・gradient_checkpointing を設定どおりに使います。"
                "auto: 学習の開始時に、この学習に必要な VRAM の見積もり（`dbnb plan 設定ファイル`、"
                "dbnb/train/planner.py：重みなしで学習ステップを実行して測ります）から、GPU に収まる最も速い"
                "組み合わせを選び、選んだ内容を表示します。対応する GPU では bf16、GPU なし: fp32。", learns=False)
    mixed_precision: str = setting("fp16", "Tuning", "Mixed Precision",
                                   "fp16 (T4 / most Colab GPUs), bf16 (A100/H100) or no (CPU). "
                                   "Weights stay fp32 either way.", choices=("no", "fp16", "bf16"),
                                   help_ja="fp16（T4 など Colab の多くの GPU。ガイドも fp16）、bf16（A100/H100）、"
                                           "no（CPU）。どれを選んでも、学習する重み自体は fp32 のままです。", memory_saving=("fp16", "bf16"), report="always", learns=False)
    optimizer: str = setting(
        "adamw", "Tuning", "Optimizer",
        "adamw: AdamW (8-bit when use_8bit_adam is on, the default). adamw8bit: bitsandbytes' 8-bit AdamW, "
        "whatever use_8bit_adam says (use_8bit_adam=false beside it is refused). prodigy: Prodigy "
        "(pip install prodigyopt), which finds its own step size: its learning rates are multipliers, set "
        "them to 1.0; it has no 8-bit form, so use_8bit_adam does not apply. lion: Lion (bitsandbytes' "
        "8-bit Lion with use_8bit_adam, else 32-bit), usually at a 3-10x smaller learning rate than AdamW. "
        "One that cannot run here falls back to torch's AdamW with a warning.",
        choices=("adamw", "adamw8bit", "prodigy", "lion"),
        help_ja="adamw: AdamW。use_8bit_adam がオンなら 8bit 版になります（既定はオン）。adamw8bit: "
                "bitsandbytes の 8bit AdamW。use_8bit_adam=false と一緒に指定するとエラーです。prodigy: "
                "Prodigy（pip install prodigyopt が必要）。ステップ幅を自動で決めるので学習率は倍率の意味になり、"
                "1.0 にします。8bit 版はないので use_8bit_adam は関係ありません。lion: Lion。"
                "use_8bit_adam がオンなら bitsandbytes の 8bit 版、オフなら 32bit 版です。"
                "学習率は AdamW の 1/3〜1/10 くらいが普通です。この環境で動かないものは、"
                "警告を出して torch の AdamW に切り替えます。")
    use_8bit_adam: bool = setting(True, "Tuning", "Use 8bit Adam",
                                  "bitsandbytes' 8-bit optimizer state: much less VRAM (the seed: "
                                  "a must on 12 GB cards). "
                                  "With optimizer=adamw (the webui's switch for adamw8bit) or lion. "
                                  "Falls back to torch's AdamW with a warning where bitsandbytes does not work.",
                                  help_ja="bitsandbytes の 8bit オプティマイザを使います（optimizer=adamw なら 8bit AdamW、"
                                          "lion なら 8bit Lion）。VRAM を大きく節約でき、"
                                          "ガイドでは 12GB のカードなら必須。bitsandbytes が動かない環境では、"
                                          "警告を出して torch の AdamW に切り替えます。", memory_saving=True, report="always")
    adam_beta1: float = setting(0.9, "Tuning", "Adam Beta 1", "AdamW beta1.",
                                help_ja="AdamW の beta1。")
    adam_beta2: float = setting(0.999, "Tuning", "Adam Beta 2", "AdamW beta2.",
                                help_ja="AdamW の beta2。")
    adam_weight_decay: float = setting(1e-2, "Tuning", "Adam Weight Decay", "AdamW weight decay.",
                                       help_ja="AdamW の weight decay（重み減衰）。")
    adam_epsilon: float = setting(1e-8, "Tuning", "Adam Epsilon", "AdamW epsilon.",
                                  help_ja="AdamW の epsilon。")
    attention: str = setting("sdpa", "Tuning", "Memory Attention",
                             "sdpa: PyTorch's built-in fused attention (no extra install). "
                             "xformers: when it is installed and works on this GPU.",
                             choices=("sdpa", "xformers"),
                             help_ja="sdpa: PyTorch 内蔵の高速な attention（追加のインストール不要）。xformers: "
                                     "xformers がインストール済みで、この GPU で動くときに使えます。", learns=False)
    cache_latents: bool = setting(True, "Tuning", "Cache Latents",
                                  "Encode the images with the VAE once, before training (faster, less VRAM). "
                                  "The extension's 'Don't Cache Latents' is the opposite switch.",
                                  help_ja="学習前に VAE で画像を一度だけエンコードしておきます（速く、"
                                          "VRAM も少なめ）。"
                                          "拡張機能の 「Don't Cache Latents」とは逆の意味のスイッチです（あちらのオン ＝ こちらのオフ）。", memory_saving=True, learns=False)
    cache_text_embeddings: bool = setting(
        False, "Tuning", "Cache Text Embeddings",
        "With the text encoders frozen (train_text_encoder off, or LoRA with lora_text_encoder_rank=0): encode "
        "every training prompt once, before training, and move the text encoders off the GPU (previews bring "
        "them back while they render). Saves their VRAM: about 1.6 GB for SDXL's two in fp16, what lets SDXL "
        "LoRA fit a 16 GB T4; about 0.25 GB for SD 1.x. Same result as without. Not with shuffle_caption or "
        "caption_tag_dropout_rate, which make a new prompt each step (caption_dropout_rate is fine).",
        help_ja="テキストエンコーダを学習しないとき（train_text_encoder がオフ、または LoRA で "
                "lora_text_encoder_rank=0）、学習前にすべてのプロンプトを一度だけエンコードし、テキストエンコーダを "
                "GPU から外します（プレビューの間だけ戻します）。その分の VRAM が空きます（SDXL の 2 つで fp16 約 "
                "1.6 GB。SDXL の LoRA を 16 GB の T4 に収めるのに必要。SD 1.x は約 0.25 GB）。結果は同じです。"
                "ステップごとにプロンプトが変わる shuffle_caption・caption_tag_dropout_rate とは併用できません"
                "（caption_dropout_rate は使えます）。", memory_saving=True, learns=False)
    use_ema: bool = setting(False, "Tuning", "Train EMA",
                            "Keep an exponential moving average of the UNet, saved beside the raw weights. "
                            "It costs VRAM: an fp32 copy of the UNet, 3.4 GB on SD 1.5 (the seed: "
                            "for 24 GB cards like a 3090), and disk: +1.6 GiB of weights at every save, "
                            "plus its fp32 copy in the resume state. With use_lora only the adapters are averaged: "
                            "a few MB.",
                            help_ja="UNet の指数移動平均（EMA）も保持し、通常の重みと並べて保存します。"
                                    "VRAM を多く使います（UNet の fp32 のコピー分、SD 1.5 で 3.4 GB。"
                                    "ガイドでも 3090 など向け）。ディスクも保存ごとに +1.6 GiB、"
                                    "再開用データにも fp32 のコピーが入ります。"
                                    "use_lora ではアダプタだけなので数 MB です。", memory_saving=False, report="always")
    ema_decay: float = setting(0.9999, "Tuning", "EMA Decay", "Decay of the EMA weights.",
                               help_ja="EMA の減衰率。1 に近いほど長い期間を平均します（0.9999 で約 1 万ステップ）。")
    offset_noise: float = setting(0.0, "Tuning", "Offset Noise",
                                  "Add per-channel noise offset (e.g. 0.05) for darker darks / brighter brights. 0: off.",
                                  help_ja="チャンネルごとのノイズオフセット（例: 0.05）を加え、暗部をより暗く・明部をより明るく出せるようにします。0: オフ。", minimum=0)
    snr_gamma: float = setting(0.0, "Tuning", "Min-SNR Gamma",
                               "Min-SNR loss weighting (e.g. 5.0). 0: off.",
                               help_ja="Min-SNR による loss の重み付け（例: 5.0）。0: オフ。", minimum=0)
    seed: int = setting(1234, "Tuning", "Seed", "Random seed of the run (data order, noise).",
                        help_ja="学習全体の乱数シード（データの順番、ノイズ）。")

    # --- Gradients -----------------------------------------------------------------------
    gradient_accumulation_steps: int = setting(1, "Gradients", "Gradient Accumulation Steps",
                                               "Average gradients over N batches per optimizer step.",
                                               help_ja="N バッチ分の勾配を平均してから 1 回更新します（実質のバッチサイズが N 倍になります）。", minimum=1)
    gradient_checkpointing: bool = setting(True, "Gradients", "Gradient Checkpointing",
                                           "Recompute activations in backward: less VRAM, ~20% slower. The seed: "
                                           "cards like a 3090 can turn it off.",
                                           help_ja="逆伝播のときに途中の計算結果を再計算して VRAM を減らします（速度は約 20% 低下）。"
                                                   "ガイドでは、3090 などならオフにできるとされています。", memory_saving=True, learns=False)
    max_grad_norm: float = setting(1.0, "Gradients", "Max Grad Norms",
                                   "Clip the gradient norm to this value (0: no clipping).",
                                   help_ja="勾配のノルムをこの値でクリップします（0: クリップしない）。", minimum=0)
    optimizer_in_backward: bool = setting(
        False, "Gradients", "Optimizer in Backward",
        "Experimental (not yet compared on a GPU with the default fp16 + 8-bit Adam path). "
        "Step each weight as soon as backward has its gradient, then free that gradient, so the UNet's "
        "full-size gradients (~3.4 GB fp32 for SD 1.5) never exist all at once. Same update as the normal "
        "path. Needs gradient_accumulation_steps=1, max_grad_norm=0, one GPU and mixed_precision bf16 or no "
        "(not fp16).",
        help_ja="実験的な機能（GPU で既定の fp16 + 8-bit Adam との比較はまだ）。逆伝播で勾配が出た重みから順に更新して勾配をすぐ解放するので、UNet の勾配全体（SD 1.5 で fp32 約3.4GB）が一度にメモリに載りません。更新結果は通常と同じ。gradient_accumulation_steps=1、max_grad_norm=0、GPU 1枚、mixed_precision は bf16 か no（fp16 は不可）が必要です。")
    deterministic: bool = setting(
        False, "Gradients", "Deterministic",
        "Reproducible training: the same config gives bit-identical weights, and a resumed run equals the "
        "uninterrupted one. Uses deterministic GPU kernels (cuDNN autotuning off) and, on a CPU, one thread "
        "for backward. Costs speed (see docs/performance.md); off: the fast kernels, whose sums may differ "
        "in the last bits between runs.",
        help_ja="再現性のある学習。同じ設定なら重みがビット単位で同じになり、中断から再開しても中断なしと同じ結果になります。"
                "GPU では決定的なカーネルを使い（cuDNN の自動選択はオフ）、CPU では逆伝播を1スレッドで行うため、その分遅くなります"
                "（docs/performance.md を参照）。オフなら高速なカーネルを使い、実行ごとに末尾の桁がわずかに変わることがあります。",
        learns=False, report="always")

    # --- Samples -------------------------------------------------------------------------
    sample_prompts: tuple[str, ...] = setting((), "Samples", "Sample Image Prompt",
                                              "Preview prompts. Empty: the instance prompt.",
                                              help_ja="プレビュー用のプロンプト。"
                                                      "空欄ならインスタンスプロンプトを使います。", learns=False)
    sample_negative_prompt: str = setting(QUALITY_NEGATIVE, "Samples", "Sample Negative Prompt",
                                          "Negative prompt of the previews.",
                                          help_ja="プレビューのネガティブプロンプト。", learns=False)
    num_samples: int = setting(2, "Samples", "Number of Samples to Generate",
                               "Preview images per sample prompt, at most 16. Each is a full generation while "
                               "training waits: a preview renders prompts × this, and the run warns before its "
                               f"first step when that is more than {FEW_PREVIEWS}. The seed's warning: in the "
                               "extension 5000 here made 5000 images at every preview.",
                               help_ja="サンプルプロンプト 1 つあたりのプレビュー枚数（最大 16）。1 枚ごとに画像を丸ごと"
                                       "生成し、その間は学習が止まります。1 回のプレビューは「プロンプト数 × この値」枚で、"
                                       f"{FEW_PREVIEWS} 枚を超えると学習開始前に警告します。ガイドにもあるとおり、"
                                       "拡張機能でここを 5000 にするとプレビューのたびに 5000 枚作ろうとします。",
                               minimum=1, maximum=16, learns=False)
    sample_seed: int = setting(42, "Samples", "Sample Seed", "Seed of the previews, fixed so steps compare.",
                               help_ja="プレビューのシード。固定なので、ステップごとの変化を見比べられます。", learns=False)
    sample_guidance_scale: float = setting(7.5, "Samples", "Sample CFG Scale", "CFG scale of the previews.",
                                           help_ja="プレビューの CFG スケール。", learns=False)
    sample_steps: int = setting(20, "Samples", "Sample Steps", "Sampling steps of the previews.",
                                help_ja="プレビューのサンプリングステップ数。", minimum=1, learns=False)
