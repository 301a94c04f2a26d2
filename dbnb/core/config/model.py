"""The base model a workspace trains from (notebook 01): frozen with a run, as the weights it starts from."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import setting


@dataclass(frozen=True)
class ModelSettings:
    """The base model: the checkpoint and VAE a run starts from, set in notebook 01 (step setup)."""

    # --- Model ---------------------------------------------------------------------------
    pretrained_model_name_or_path: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "Model", "Source Checkpoint",
        "Base model: a diffusers folder, a Hugging Face repo id, a single .safetensors/.ckpt "
        "file, an https:// URL or a Google Drive link. A merged model is fine.",
        help_ja="ベースモデル。diffusers 形式のフォルダ、Hugging Face の repo id、.safetensors/.ckpt の単体ファイル、"
                "https:// の URL、Google ドライブのリンクが使えます。マージモデルでもOK。", learns=False, report="apart")
    revision: str = setting("", "Model", "Revision",
                            "Hub revision (branch, tag or commit) when the base model is a repo id.",
                            help_ja="ベースモデルを repo id で指定したときに使う Hub のリビジョン（ブランチ、タグ、"
                                    "コミット）。", report="apart")
    pretrained_vae_name_or_path: str = setting(
        "", "Model", "Pretrained VAE Name or Path",
        "Optional separate VAE (folder, repo id or file). Empty: the base model's own VAE.",
        help_ja="別の VAE を使うときに指定します（フォルダ、repo id、ファイル）。"
                "空欄ならベースモデル内蔵の VAE を使います（ガイドでも空欄）。", learns=False, report="apart")
