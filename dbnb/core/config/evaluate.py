"""Testing checkpoints (`dbnb sample` / `dbnb score`, notebook 05): the test prompts, their images and the scores."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import QUALITY_NEGATIVE, setting


@dataclass(frozen=True)
class EvaluateSettings:
    """What notebook 05 (step test) renders and scores each checkpoint with. Read after training,
    never by it: a resume may change them."""

    # --- Test Prompts --------------------------------------------------------------------
    # The seed's way to pick a checkpoint: first "<instance prompt>, 1girl, solo" until it looks
    # slightly overfit, then other clothes / places to see it is still flexible.
    test_fidelity_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo",), "Test Prompts", "Fidelity Prompts",
        "Prompts that should show the character as trained; {instance_prompt} and {class_prompt} are filled in.",
        help_ja="学習したとおりのキャラが出るべきプロンプト（再現度を見ます）。"
                "{instance_prompt} と {class_prompt} は自動で埋まります。", learns=False)
    test_flexibility_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo, school uniform, classroom",
         "{instance_prompt}, 1girl, solo, swimsuit, beach",
         "{instance_prompt}, 1girl, solo, winter coat, snowy street"), "Test Prompts", "Flexibility Prompts",
        "Prompts that ask for other clothes / places: a good checkpoint follows them.",
        help_ja="別の服や場所を指定するプロンプト（汎用性を見ます）。良いチェックポイントはこの指定に従います。", learns=False)
    test_negative_prompt: str = setting(QUALITY_NEGATIVE, "Test Prompts", "Test Negative Prompt",
                                        "Negative prompt of the test images (the seed's quality negative).",
                                        help_ja="テスト画像のネガティブプロンプト（ガイドの品質ネガ）。", learns=False)
    test_class_prompt_in_negative: bool = setting(
        False, "Test Prompts", "Class Prompt in Negative",
        "Also put the class prompt in the negative (the seed's 'Instance prompt + Class prompt ネガ' call).",
        help_ja="クラスプロンプトもネガに入れます（ガイドの「Instance prompt + Class prompt ネガ」という呼び出し方）。", learns=False)
    test_seeds: int = setting(4, "Test Prompts", "Seeds per Prompt", "Images per prompt and checkpoint (seeds 0..N-1).",
                              help_ja="プロンプト・チェックポイントごとの枚数（シード 0〜N-1）。", minimum=1, learns=False)
    test_steps: str = setting("all", "Test Prompts", "Checkpoints to Test",
                              "'all', or step numbers like '1000,2000,3000'. The base model is always a baseline row.",
                              help_ja="'all' か、'1000,2000,3000' のようなステップ数。"
                                      "比較用にベースモデルも必ず並べます。", learns=False)
    lora_scale: float = setting(1.0, "Test Prompts", "LoRA Weight",
                                "LoRA runs: the adapters' strength in test images and scores (the webui's "
                                "<lora:name:1.0>).",
                                help_ja="LoRA の学習のとき: "
                                        "テスト画像と採点でのアダプタの強さ（webui の <lora:名前:1.0> の数字）。", learns=False)
    # The guide's 花月 report: close-ups and back views in the set broke wide outputs, which square
    # test images never show; one wide render of the first fidelity prompt lets the scores see it.
    test_wide: float = setting(
        1.5, "Test Prompts", "Wide Test Image",
        "Width ÷ height of one more test image of the first fidelity prompt, as tall as resolution "
        "(1.5 at 512: 768×512; the width is rounded to a multiple of 8). Its fidelity counts in the scores: "
        "close-ups and back views in the training set break wide pictures (the guide's 花月 test). 0: none.",
        help_ja="最初の再現度プロンプトで追加する横長テスト画像の 幅 ÷ 高さ（高さは resolution。512 で 1.5 なら "
                "768×512、幅は 8 の倍数に丸めます）。この画像の再現度も採点に入ります。学習画像にドアップや背面の"
                "画像があると横長の出力が崩れます（ガイドの花月の例）。0 で作りません。",
        minimum=0, maximum=4, learns=False)
    test_guidance_scale: float = setting(7.5, "Test Prompts", "Test CFG Scale", "CFG scale of the test images.",
                                         help_ja="テスト画像の CFG スケール。", learns=False)
    test_infer_steps: int = setting(28, "Test Prompts", "Test Sampling Steps", "Sampling steps of the test images.",
                                    help_ja="テスト画像のサンプリングステップ数。", minimum=1, learns=False)
    clip_model: str = setting("openai/clip-vit-base-patch32", "Test Prompts", "CLIP Model",
                              "CLIP for CLIP-I / CLIP-T scores (Hub id or local folder).",
                              help_ja="CLIP-I / CLIP-T スコア用の CLIP（Hub の id かローカルのフォルダ）。", learns=False)
    dino_model: str = setting("facebook/dino-vits16", "Test Prompts", "DINO Model",
                              "DINO ViT for the DINO fidelity score (Hub id or local folder).",
                              help_ja="DINO スコア（再現度）用の DINO ViT（Hub の id かローカルのフォルダ）。", learns=False)
    score_with: str = setting(
        "clip", "Test Prompts", "Score With",
        "clip: CLIP-I / DINO / CLIP-T (any model). ccip: anime characters — fidelity by deepghs' CCIP "
        "(share of test images judged the same character as the instance pictures), flexibility by tag "
        "adherence (the WD14 tagger, tagger_model, finds the prompt's asked-for tags). world: pixel analysis "
        "of dbnb's tiny world (the demo model): identity, swapped sides, copied poses, hair following the "
        "prompt, class drift.",
        choices=("clip", "ccip", "world"),
        # world reads only the tiny demo world's drawn characters: dbnb demo and the tests name it
        demo_only=("world",),
        help_ja="clip: CLIP-I / DINO / CLIP-T（どのモデルでも）。ccip: アニメキャラ向け。"
                "再現度は deepghs の CCIP（学習画像と同じキャラと判定された割合）、"
                "汎用性はタグの再現率（プロンプトで指定したタグを WD14 タガーが見つけた割合）。world: "
                "dbnb の小さな世界モデル（デモ）用の画素解析。", learns=False)
    ccip_model: str = setting(
        "deepghs/ccip_onnx", "Test Prompts", "CCIP Model",
        "For score_with=ccip: the Hub repo deepghs/ccip_onnx (its default model), deepghs/ccip_onnx/<model> "
        "for another of its models, or a local folder holding model_feat.onnx, model_metrics.onnx and "
        "metrics.json.",
        help_ja="score_with=ccip で使う CCIP モデル。Hub の deepghs/ccip_onnx（既定モデル）、"
                "deepghs/ccip_onnx/<モデル名>、または model_feat.onnx・model_metrics.onnx・metrics.json を"
                "置いたローカルフォルダ。", learns=False)
    flexibility_tolerance: float = setting(
        0.01, "Test Prompts", "Flexibility Tolerance",
        "The recommended checkpoint is the most faithful one whose CLIP-T is within this of the best.",
        help_ja="おすすめのチェックポイントは、汎用性のスコア（CLIP-T）が最高値からこの差以内のものの中で、"
                "最も再現度の高いものです。", minimum=0, learns=False)
