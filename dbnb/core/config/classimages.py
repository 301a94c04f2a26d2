"""Class-image making (`dbnb classimages`, notebook 03): how the regularization pictures are generated, drawn or imported."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import QUALITY_NEGATIVE, setting


@dataclass(frozen=True)
class ClassImageSettings:
    """How `dbnb classimages` makes the class pictures (step class_images). The trainer reads the
    pictures and the settings in TrainSettings (with_prior_preservation, num_class_images,
    prior_loss_weight, class_data_dir, class_prompt), not these: a resume may change them."""

    class_negative_prompt: str = setting(QUALITY_NEGATIVE, "Class Images", "Classification Image Negative Prompt",
                                         "Negative prompt when generating class images.",
                                         help_ja="正則化画像を生成するときのネガティブプロンプト。", learns=False)
    class_guidance_scale: float = setting(12.0, "Class Images", "Classification CFG Scale",
                                          "CFG scale when generating class images (the seed: 12).",
                                          help_ja="正則化画像を生成するときの CFG スケール（ガイドでは 12）。", learns=False)
    class_infer_steps: int = setting(28, "Class Images", "Classification Steps",
                                     "Sampling steps when generating class images (the seed: 28).",
                                     help_ja="正則化画像を生成するときのサンプリングステップ数（ガイドでは 28）。", minimum=1, learns=False)
    class_images_mode: str = setting(
        "generate", "Class Images", "Class Image Source",
        "generate: with the base model and class_prompt. transparent: fully transparent PNGs, "
        "the seed community's trick; the trainer puts them on background_color (white), "
        "so they train as plain white images. black: opaque black images, "
        "what the old extension trained the transparent ones as (it dropped the alpha); "
        "to reproduce that choose black here, not background_color=black, "
        "which would blacken your pictures' background too. import: copy from class_images_import.",
        choices=("generate", "transparent", "black", "import"),
        help_ja="generate: ベースモデルと class_prompt で生成します。transparent: スレ定番の全面透過 PNG。"
                "学習では background_color（白）で塗られ、真っ白な画像として学習されます。black: 不透明な黒い画像。"
                "旧拡張機能はアルファを捨てていたので、透過画像は黒として学習されていました。"
                "それを再現するならここを black にします（background_color=black にすると学習画像の背景まで黒くなります）。"
                "import: class_images_import からコピーします。", learns=False)
    class_images_import: str = setting("", "Class Images", "Import Class Images From",
                                       "Folder, .zip or Google Drive link to copy class images from (mode import).",
                                       help_ja="正則化画像のコピー元のフォルダ、.zip、"
                                               "Google ドライブのリンク（import のとき）。", learns=False)
    class_sampler: str = setting("dpmpp_2m", "Class Images", "Classification Sampler",
                                 "Sampler for generated class images.", choices=("ddim", "euler_a", "dpmpp_2m"),
                                 help_ja="正則化画像を生成するときのサンプラー。", learns=False)
    class_seed: int = setting(0, "Class Images", "Classification Seed",
                              "Seed of class image k is class_seed + k, so a rerun regenerates the same images.",
                              help_ja="k 枚目の正則化画像のシードは class_seed + k。やり直しても同じ画像ができます。", minimum=0, learns=False)
    class_batch_size: int = setting(0, "Class Images", "Class Image Batch Size",
                                    "Images generated at once; 0 picks it from free VRAM.",
                                    help_ja="一度に生成する枚数。0 なら空き VRAM から自動で決めます。", minimum=0, learns=False)
