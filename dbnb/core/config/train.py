"""What the trainer learns from and how: folders, prompts and captions, prior preservation, steps, learning rates, LoRA, image processing."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import LR_SCHEDULERS, setting


@dataclass(frozen=True)
class TrainSettings:
    """What the trainer reads about the data and the schedule: frozen with a run. Some are set in an
    earlier notebook (their `step`): resolution and the tokens in 02, the class prompt, folder and
    prior preservation in 03, output_dir in 01; the trainer reads them all."""

    # --- Directories ---------------------------------------------------------------------
    instance_data_dir: str = setting("", "Directories", "Dataset Directory",
                                     "Folder with the character's training images (+ optional .txt captions). "
                                     "The seed recommends 5-10 good pictures: quality over quantity.",
                                     help_ja="キャラの学習画像を入れたフォルダ（.txt のキャプションは任意）。"
                                             "ガイドのおすすめは 5〜10 枚で、枚数より質が大事です。", step="dataset", report="apart")
    class_data_dir: str = setting("", "Directories", "Classification Dataset Directory",
                                  "Folder with the class (regularization) images.",
                                  help_ja="正則化画像（クラス画像）を入れたフォルダ。", step="class_images", report="apart")
    output_dir: str = setting("dbnb-runs", "Directories", "Model Directory",
                              "Where run folders are written. On Colab put it on Drive so a lost session loses nothing.",
                              help_ja="学習フォルダの保存先。Colab ではセッションが切れても消えないよう、"
                                      "Google ドライブ上にしてください。", step="setup", learns=False, report="apart")
    run_name: str = setting("run", "Directories", "Name",
                            "The run folder's name under output_dir; also the exported file's name.",
                            help_ja="output_dir の下に作る学習フォルダの名前で、"
                                    "書き出すモデルファイルの名前にもなります。", report="apart", learns=False)
    concepts_list: str = setting("", "Directories", "Concepts List",
                                 "Optional JSON file listing several concepts (instance_data_dir, instance_prompt, "
                                 "class_data_dir, class_prompt each). Replaces the single-concept fields.",
                                 help_ja="複数のコンセプトを並べた JSON ファイル（各項目に instance_data_dir・instance_prompt・class_data_dir・class_prompt）。"
                                         "指定すると、コンセプト 1 つ用の欄の代わりにこちらを使います。"
                                         "ガイドの使い方では不要（空欄）です。", report="apart")

    # --- Prompts -------------------------------------------------------------------------
    instance_prompt: str = setting(
        "", "Prompts", "Instance Prompt",
        "Prompt that calls the character: the guide's two words, a rare name and a throwaway word (its reversal "
        "is easy to remember), e.g. 'nanU Unan', where class_prompt is the second word 'Unan'. Why two: the first "
        "word takes the look, the second the meaning; 'nanU Unan' calls both strongly, and when 'Unan' fights "
        "other prompts (an outfit or pose that will not come), drop it and prompt 'nanU' alone, which one word "
        "cannot do (the guide also found one word learns less exactly). Not a common word such as 1girl: the "
        "class images teach the second word. May contain [filewords].",
        help_ja="キャラを呼び出すプロンプト。ガイドの2語方式: 学習対象の名前（珍しい単語）+ 半角スペース + 適当な単語"
                "（名前を反転させたものが覚えやすい）。例: 'nanU Unan'、class_prompt は2語目の 'Unan'。2語にする理由: "
                "nanU に絵柄、Unan に意味が付き、'nanU Unan' で強力に呼び出せる。Unan が他のプロンプトの邪魔をする"
                "（服やポーズの指示が効かない）ときは Unan を外して 'nanU' だけにでき、1語ではこの切り離しができない"
                "（1語だと学習精度も落ちるとされる）。1girl など普段使う単語は避ける（正則化画像が2語目を学習するため）。"
                "[filewords] も使えます。", report="apart")
    class_prompt: str = setting(
        "", "Prompts", "Class Prompt",
        "Prompt of the class images: the second word of the instance prompt, a throwaway word such as 'Unan' "
        "(for 'nanU Unan'). The class images teach this word what they show, so with transparent / black ones it "
        "comes to mean a plain picture: never a word you prompt with (girl, 1girl, person …; the guide: 'if it "
        "were girl, you would be stuck the day you want to use girl'). A common word only with generated or "
        "imported class pictures of it. May contain [filewords].",
        help_ja="正則化画像（クラス画像）のプロンプト。インスタンスプロンプトの2語目、意味のない単語（'nanU Unan' なら "
                "'Unan'）。正則化画像の内容がこの単語に学習されるので、透過・黒の画像なら無地の絵を意味するようになります。"
                "girl・1girl・person など普段使う単語にしないこと（ガイド:「ここを仮にgirlにした場合、ふとgirlを使用したい"
                "場面が出た時に困ってしまう」）。普段の単語は生成・取り込みの実画像のときだけ。[filewords] も使えます。",
        step="class_images", report="apart")
    instance_token: str = setting("", "Prompts", "Instance Token",
                                  "With [filewords]: the character's token, inserted into captions that lack it.",
                                  help_ja="[filewords] を使うときのキャラの単語（例: nanU）。"
                                          "キャプションになければ自動で入れます。"
                                          "[filewords] を使わないなら空欄で構いません。", step="dataset", report="apart")
    class_token: str = setting(
        "", "Prompts", "Class Token",
        "The class word, put after the instance token in captions ([filewords]); the notebooks build the prompts "
        "from the two ('nanU' + 'Unan': instance prompt 'nanU Unan', class prompt 'Unan'). A throwaway word, not "
        "1girl: see class_prompt.",
        help_ja="クラスの単語。キャプション（[filewords]）で instance token の後ろに置かれ、ノートブックはこの2つから"
                "プロンプトを作ります（'nanU' + 'Unan' → インスタンスプロンプト 'nanU Unan'、クラスプロンプト 'Unan'）。"
                "1girl ではなく意味のない単語に（class_prompt の説明を参照）。", step="dataset", report="apart")
    # kohya sd-scripts' caption options, with its names and meaning (`process_caption`).
    shuffle_caption: bool = setting(
        False, "Prompts", "Shuffle Caption",
        "Each step, shuffle the comma-separated tags of the prompt (after [filewords] is filled in), so no "
        "tag order is learnt. The first keep_tokens tags stay in place. Class prompts are treated the same.",
        help_ja="ステップごとにプロンプトのタグ（カンマ区切り。[filewords] の展開後）をシャッフルし、"
                "タグの順番を覚えないようにします。先頭の keep_tokens 個はそのまま。"
                "正則化画像のプロンプトも同じです。")
    keep_tokens: int = setting(
        0, "Prompts", "Keep N Tokens",
        "With shuffle_caption / caption_tag_dropout_rate: the first N comma-separated tags stay first and "
        "are never dropped. 1 keeps 'nanU Unan' (the trigger) in front.",
        help_ja="先頭の N 個のタグ（カンマ区切り）はシャッフルもドロップもしません。1 ならトリガーワード（例: "
                "nanU Unan）が常に先頭に残ります。", minimum=0)
    caption_dropout_rate: float = setting(
        0.0, "Prompts", "Rate of Caption Dropout",
        "Share of steps (0-1) in which a picture's whole prompt is replaced by the empty prompt.",
        help_ja="画像のプロンプトを丸ごと空にするステップの割合（0〜1）。", minimum=0, maximum=1)
    caption_tag_dropout_rate: float = setting(
        0.0, "Prompts", "Rate of Tag Dropout",
        "Each step, each tag after the first keep_tokens is left out with this probability (0-1).",
        help_ja="ステップごとに、keep_tokens より後のタグをそれぞれこの確率（0〜1）で省きます。", minimum=0, maximum=1)
    clip_skip: int = setting(
        0, "Prompts", "Clip Skip",
        "Which text-encoder layer the prompt is read from, counted as the webui's \"Clip skip\" and kohya's "
        "clip_skip count: 1 the last, 2 the penultimate. Training, previews, test images and class images use "
        "it; exports record it (ss_clip_skip) so you render at the same value. 0: the base model's own (SD 1.x: "
        "1; SDXL: 2). Anime SD 1.x bases (NovelAI's descendants) are used at 2. SDXL bases (Pony, Illustrious, "
        "NoobAI, Animagine) are already read from the penultimate layer, which is what their \"clip skip 2\" "
        "means: SDXL takes only 0 or 2 (the webui and kohya's SDXL trainer ignore other values).",
        help_ja="プロンプトをテキストエンコーダのどの層から読むか。webui の「Clip skip」・kohya の clip_skip と同じ数え方で、"
                "1 が最終層、2 が最後から 2 番目の層です。学習・プレビュー・テスト画像・正則化画像の生成に使い、"
                "書き出したファイルに記録します（ss_clip_skip。生成時も同じ値に）。0: ベースモデル本来の値"
                "（SD 1.x は 1、SDXL は 2）。アニメ系の SD 1.x モデル（NovelAI 系）は 2 で使われます。SDXL 系"
                "（Pony・Illustrious・NoobAI・Animagine）は元から最後から 2 番目の層を読んでおり、これがそれらの"
                "「clip skip 2」の意味です。SDXL では 0 か 2 だけを受け付けます（webui や kohya の SDXL 学習は"
                "ほかの値を無視するため）。", minimum=0, maximum=12, report="always")

    # --- Class Images --------------------------------------------------------------------
    with_prior_preservation: bool = setting(
        False, "Class Images", "Use Class Images (prior preservation)",
        "Train on class images beside the instance images so the class word keeps its meaning.",
        help_ja="学習画像と一緒に正則化画像も学習し、クラスの単語（1girl など）の意味が崩れないようにします。"
                "過学習しにくくなるとされています。")
    num_class_images: int = setting(0, "Class Images", "Total Number of Class/Reg Images",
                                    "How many class images to use. Must not exceed what the class folder holds "
                                    "(the seed warns: make it match the folder).",
                                    help_ja="使う正則化画像の枚数。"
                                            "正則化画像フォルダに入っている枚数を超えないようにしてください（ガイドでも「フォルダの中身の枚数と必ず一致させて」と念押しされています）。", minimum=0)
    prior_loss_weight: float = setting(1.0, "Class Images", "Prior Loss Weight",
                                       "Weight of the class-image loss against the instance loss.",
                                       help_ja="学習画像の loss に対する、正則化画像の loss の重み。", minimum=0)

    # --- Intervals -----------------------------------------------------------------------
    max_train_steps: int = setting(
        3000, "Intervals", "Training Steps",
        "Total optimizer steps of the whole run. The seed's runs (text encoder trained): ~3000 for 3 images "
        "(7000 for 5 was called maybe too many); 10000-20000 for 20-100 images with detailed outfits. Aim for "
        "slightly overfit, then check flexibility (notebook 5). On resume it is still the total: a run stopped at "
        "2000 of 3000 trains 1000 more, where the webui extension trains the set steps again from the stop; "
        "to train N more, set max_train_steps to the step reached + N.",
        help_ja="学習全体の合計ステップ数。ガイドの実例（テキストエンコーダも学習）: 3枚で約3000（5枚で7000は多すぎるかも）、"
                "衣装が細かい20〜100枚で10000〜20000。少し過学習気味が目安。再開しても合計のままです: 3000 のうち 2000 で"
                "止めた学習は残り 1000 だけ進みます（拡張機能は止めた地点から『設定したステップ分』進みます）。さらに N "
                "ステップ進めたいときは、到達したステップ + N を設定してください。", learns=False, report="always")
    num_train_epochs: int = setting(0, "Intervals", "Training Epochs",
                                    "If > 0, train this many epochs instead of max_train_steps. "
                                    "One epoch is as many pictures as the larger of the training images and the class images (the seed's definition; "
                                    "the smaller set repeats): at batch 1 on one GPU, "
                                    "5 pictures with 50 class images make 50 steps an epoch.",
                                    help_ja="0 より大きいと、max_train_steps の代わりにこのエポック数だけ学習します。"
                                            "1 エポックは学習画像と正則化画像の多い方の枚数です（ガイドと同じ定義。"
                                            "少ない方は繰り返し使います）。バッチ 1・GPU 1 枚なら、"
                                            "学習画像 5 枚と正則化画像 50 枚で 1 エポック 50 ステップです。", minimum=0, learns=False)
    save_every_steps: int = setting(
        500, "Intervals", "Save Checkpoint Frequency",
        "Save trained weights + resume state every N steps (0: only at the end), at multiples of N counted from "
        "step 0 of the run, also after a resume (the webui extension counts again from the stop). Every save "
        "keeps its weights: on SD 1.5 1.8 GiB (the fp16 UNet 1.6 GiB + the text encoder 0.23 GiB; +1.6 GiB with "
        "use_ema) where the seed says 2 GB a model; the newest keep_last_n also keep a 5.5 GiB resume state "
        "(4.8 GiB without the text encoder). The default run (3000 steps, every 500) needs about 22 GiB at its "
        "peak; the run checks what it needs against the free space before its first step. The seed: 500 is "
        "enough; small values fill the disk.",
        help_ja="N ステップごとに学習済みの重みと再開用データを保存（0: 最後だけ）。学習の開始（ステップ 0）から数えた N の"
                "倍数で保存し、再開後も同じです（拡張機能は中断地点から数え直します）。重みは保存ごとに残ります。SD 1.5 では "
                "1 回 1.8 GiB（fp16 の UNet 1.6 GiB + テキストエンコーダ 0.23 GiB。use_ema で +1.6 GiB。ガイドの「一個2GB」"
                "にあたります）、最新 keep_last_n 個には再開用データ 5.5 GiB（テキストエンコーダなしで 4.8 GiB）も付きます。"
                "既定の学習（3000 ステップ、500 ごと）は最大で約 22 GiB 必要で、学習開始前に空き容量と照らし合わせます。"
                "ガイドでは 500 で十分、小さいとディスクを圧迫します。", minimum=0, learns=False)
    sample_every_steps: int = setting(0, "Intervals", "Save Preview(s) Frequency",
                                      "Write preview images every N steps (0: never; the seed turns it off on 12 GB cards).",
                                      help_ja="N ステップごとにプレビュー画像を作ります（0: 作らない）。ガイドでは、"
                                              "VRAM 12GB だと落ちるので 0 推奨。", minimum=0, learns=False, memory_saving=0)
    keep_last_n: int = setting(1, "Intervals", "Keep Last N Resume States",
                               "Resume states older than the newest N are deleted: the fp32 master weights and the "
                               "optimizer's state, on SD 1.5 with 8-bit Adam 5.5 GiB (4.8 GiB without train_text_encoder). Trained weights are kept; "
                               "while a save is written, one more state exists until the oldest goes.",
                               help_ja="最新 N 個より古い再開用データ（fp32 の重みとオプティマイザの状態。SD 1.5 と 8bit Adam で 5.5 GiB、テキストエンコーダを学習しないなら 4.8 GiB）を削除します。学習済みの重みは残ります。保存中は一時的にもう 1 個増えます。", minimum=1, learns=False)

    # --- Learning Rate -------------------------------------------------------------------
    learning_rate: float = setting(1e-6, "Learning Rate", "Learning Rate",
                                   "UNet learning rate. The seed: 1e-6 whatever the number of images; "
                                   "higher is said to hurt flexibility.",
                                   help_ja="UNet の学習率。ガイドでは画像の枚数に関係なく 1e-6（0.000001）。"
                                           "これより大きいと汎用性に問題が出るとされています。", above=0, report="always")
    scale_lr: bool = setting(False, "Learning Rate", "Scale Learning Rate",
                             "Multiply the learning rate by batch size x gradient accumulation x GPUs (diffusers' meaning). "
                             "At batch 1 without accumulation on one GPU (Colab) that is x1: on or off, "
                             "nothing changes. "
                             "It does NOT lower the LR as training goes on (the guide says it does); "
                             "the scheduler does that.",
                             help_ja="学習率に「バッチサイズ × 勾配累積 × GPU 数」を掛けます（diffusers と同じ意味）。"
                                     "バッチ 1・勾配累積 1・GPU 1 枚（Colab など）では 1 倍なので、"
                                     "オンでもオフでも何も変わりません。"
                                     "ガイドには「ステップが進むごとに学習率を下げる機能」とありますが、"
                                     "それはスケジューラ（lr_scheduler）の役目です。", report="always")
    lr_scheduler: str = setting("polynomial", "Learning Rate", "Learning Rate Scheduler",
                                "How the LR changes after the warm-up. "
                                "The seed recommends polynomial (which decays it to 1e-7 by the last step); "
                                "newer versions of the extension start at constant, and the seed says to set it back.",
                                choices=LR_SCHEDULERS,
                                help_ja="ウォームアップ後の学習率の変え方。"
                                        "ガイドのおすすめは polynomial（最後のステップまでに 1e-7 へ下げていきます）。"
                                        "拡張機能の新しいバージョンは初期値が constant ですが、"
                                        "ガイドでは polynomial に戻すのが無難としています。", report="always")
    lr_warmup_steps: int = setting(15, "Learning Rate", "Learning Rate Warmup Steps",
                                   "Steps with the LR rising from 0 (the seed: about 15).",
                                   help_ja="学習の最初に学習率を 0 から徐々に上げるステップ数（ウォームアップ）。"
                                           "学習の初動の無茶な学習を避けるためのもので、ガイドでは 15 くらい。", minimum=0)
    lr_power: float = setting(1.0, "Learning Rate", "Polynomial Power",
                              "Power of the polynomial schedule (1.0: linear decay).",
                              help_ja="polynomial での学習率の下がり方（次数）。1.0 なら直線的に下がります。")
    lr_num_cycles: int = setting(1, "Learning Rate", "Cosine Restarts",
                                 "Number of restarts for cosine_with_restarts.",
                                 help_ja="cosine_with_restarts で学習率を上げ直す回数。", minimum=1)
    train_text_encoder: bool = setting(
        True, "Learning Rate", "Train Text Encoder",
        "Also fine-tune the CLIP text encoder, as the webui extension does by default (and its Auto-Adjust for "
        "12-24 GB): the guide's numbers (LR 1e-6, 3000-20000 steps) were reached with it on. Cost on SD 1.5, "
        "computed, not yet measured by dbnb on a GPU: ~1 GB more VRAM (123 M weights: fp32 master, gradients, "
        "8-bit Adam state), a few % per step, +0.23 GiB a save, +0.7 GiB a resume state; on a T4 (15 GB) the "
        "published 9.92 GB of fp16 + 8-bit Adam + gradient checkpointing becomes ~11 GB, so every "
        "memory_profile tier keeps it on. Off (where it does not fit: an out-of-memory stop names it): only the "
        "UNet learns, the likeness comes more slowly and the guide's step counts are not comparable. With "
        "use_lora this switch is not used: lora_text_encoder_rank > 0 gives the text encoder adapters instead.",
        help_ja="CLIP テキストエンコーダも学習します。拡張機能のデフォルト（と 12〜24GB 向けの Auto-Adjust）と同じで、"
                "ガイドの数値（学習率 1e-6、3000〜20000 ステップ）はこれがオンの状態での結果です。SD 1.5 での負担（計算値、"
                "dbnb の GPU 実測はまだ）: VRAM 約 1GB 増（1.23 億個の重みの fp32 コピー・勾配・8bit Adam の状態）、1ステップ"
                "数%遅く、保存 1 回 +0.23 GiB、再開用データ +0.7 GiB。T4（15GB）では公開値 9.92GB（fp16 + 8bit Adam + "
                "gradient checkpointing）が約 11GB になる計算で、memory_profile のどの段でもオンのままです。オフにすると"
                "（VRAM が足りない場合。メモリ不足で止まったときに案内されます）UNet だけが学習し、似るまでが遅く、"
                "ガイドのステップ数とは比べられません。use_lora では使いません（lora_text_encoder_rank > 0 で"
                "テキストエンコーダにアダプタを付けます）。", memory_saving=False, report="always")
    text_encoder_lr: float = setting(1e-6, "Learning Rate", "Text Encoder Learning Rate",
                                     "Learning rate of the text encoder when it is trained.",
                                     help_ja="テキストエンコーダを学習するときの学習率。", above=0)
    text_encoder_2_lr: float = setting(
        0.0, "Learning Rate", "Text Encoder 2 Learning Rate",
        "SDXL: learning rate of the second text encoder (OpenCLIP bigG, 695 M weights) when the text encoders "
        "are fine-tuned whole (train_text_encoder, not use_lora); text_encoder_lr is then the first's (CLIP-L), "
        "as kohya's learning_rate_te1 / te2. 0: the same as the first. SD 1.x has one text encoder and does not "
        "use it.",
        help_ja="SDXL: テキストエンコーダを丸ごと学習するとき（train_text_encoder、use_lora でない）の 2 つ目"
                "（OpenCLIP bigG、6.95 億個の重み）の学習率。text_encoder_lr は 1 つ目（CLIP-L）の学習率になります"
                "（kohya の learning_rate_te1 / te2 と同じ）。0: 1 つ目と同じ。SD 1.x はテキストエンコーダが 1 つなので"
                "使いません。", minimum=0)
    stop_text_encoder: float = setting(1.0, "Learning Rate", "Step Ratio of Text Encoder Training",
                                       "Fraction of the run (0-1) after which the text encoder is frozen.",
                                       help_ja="学習全体のこの割合（0〜1）を過ぎたらテキストエンコーダの学習を止めます。"
                                               "1.0 なら最後まで学習します。", minimum=0, maximum=1)

    use_lora: bool = setting(
        False, "Learning Rate", "Use LORA",
        "Train LoRA adapters instead of the whole UNet: a file of tens of MB that the webui puts on any base "
        "model (<lora:name:0.8>), less VRAM, faster steps. Uses lora_learning_rate, not learning_rate.",
        help_ja="UNet 全体ではなく LoRA アダプタを学習します。数十 MB のファイルになり、webui でどのベースモデルにも"
                "重ねられます（<lora:名前:0.8>）。VRAM が少なく、速く学習できます。学習率は learning_rate ではなく "
                "lora_learning_rate を使います。")
    lora_rank: int = setting(32, "Learning Rate", "Lora UNET Rank",
                             "LoRA rank (kohya's network_dim) of the UNet's attention / feed-forward layers.",
                             help_ja="UNet の attention / feed-forward 層の LoRA のランク（kohya の network_dim）。")
    lora_alpha: float = setting(0.0, "Learning Rate", "Lora Alpha",
                                "LoRA alpha (kohya's network_alpha): adapters act at alpha / rank. 0: the rank "
                                "(scale 1).",
                                help_ja="LoRA の alpha（kohya の network_alpha）。アダプタは alpha / rank の強さで効きます。"
                                        "0: ランクと同じ（倍率 1）。", minimum=0)
    lora_conv_rank: int = setting(0, "Learning Rate", "Lora Conv Rank (LoCon)",
                                  "Rank of LoCon adapters on the ResNet convs and up/down samplers (kohya's "
                                  "conv_dim; alpha keeps the alpha / rank ratio). 0: attention / linear layers only.",
                                  help_ja="ResNet の畳み込み層と up/down サンプラーにも付ける LoCon のランク（kohya の "
                                          "conv_dim。alpha は alpha / rank の比を保ちます）。0: attention / 線形層だけ。", minimum=0)
    lora_text_encoder_rank: int = setting(0, "Learning Rate", "Lora Text Encoder Rank",
                                          "Rank of LoRA adapters on every text-encoder layer (q/k/v/out and MLP). "
                                          "0: the text encoder is not trained.",
                                          help_ja="テキストエンコーダの全層（q/k/v/out と MLP）に付ける LoRA のランク。"
                                                  "0: テキストエンコーダは学習しません。", minimum=0)
    lora_learning_rate: float = setting(1e-4, "Learning Rate", "Lora UNET Learning Rate",
                                        "Learning rate of the UNet's adapters (with use_lora).",
                                        help_ja="UNet のアダプタの学習率（use_lora のとき）。", above=0)
    lora_text_encoder_learning_rate: float = setting(5e-5, "Learning Rate", "Lora Text Encoder Learning Rate",
                                                     "Learning rate of the text encoder's adapters (with use_lora).",
                                                     help_ja="テキストエンコーダのアダプタの学習率（use_lora のとき）。", above=0)
    lora_text_encoder_2_learning_rate: float = setting(
        0.0, "Learning Rate", "Lora Text Encoder 2 Learning Rate",
        "SDXL: learning rate of the second text encoder's (OpenCLIP bigG) adapters, with use_lora and "
        "lora_text_encoder_rank > 0; lora_text_encoder_learning_rate is then the first's (CLIP-L). 0: the same "
        "as the first. SD 1.x has one text encoder and does not use it.",
        help_ja="SDXL: 2 つ目のテキストエンコーダ（OpenCLIP bigG）のアダプタの学習率（use_lora で "
                "lora_text_encoder_rank > 0 のとき）。lora_text_encoder_learning_rate は 1 つ目（CLIP-L）の学習率に"
                "なります。0: 1 つ目と同じ。SD 1.x はテキストエンコーダが 1 つなので使いません。", minimum=0)
    lora_dropout: float = setting(0.0, "Learning Rate", "Lora Dropout",
                                  "Dropout on the adapters' input (kohya's network_dropout). 0: off.",
                                  help_ja="アダプタの入力に掛けるドロップアウト（kohya の network_dropout）。0: オフ。")

    # --- Image Processing ----------------------------------------------------------------
    resolution: int = setting(512, "Image Processing", "Resolution",
                              "Training size in pixels (multiple of 8). SD 1.x: 512.",
                              help_ja="学習解像度（ピクセル、8 の倍数）。SD 1.x は 512（ガイドも 512）。", step="dataset", report="always")
    center_crop: bool = setting(False, "Image Processing", "Center Crop",
                                "Crop the center square instead of resizing the whole image. The seed: "
                                "off (the pictures are already square).",
                                help_ja="画像全体を縮小する代わりに、中央の正方形を切り抜きます。"
                                        "ガイドではオフ（素材は正方形に揃えてあるため）。")
    hflip: bool = setting(False, "Image Processing", "Apply Horizontal Flip",
                          "Randomly mirror images. Off by default: the seed found it mixes the left and right "
                          "colours of asymmetric designs.",
                          help_ja="画像をランダムに左右反転して水増しします。既定はオフ: ガイドでは、"
                                  "左右非対称なデザインだと左右の色が混ざるとされています。", report="always")
    alpha_mask_loss: bool = setting(
        False, "Image Processing", "Alpha Mask",
        "Weight the loss of each pixel by the picture's alpha, scaled to latent size (kohya's --alpha_mask): "
        "transparent parts are not learnt. The picture itself is still put on background_color for the VAE; "
        "pictures without alpha count everywhere. Fully transparent class images are refused (they would add "
        "no loss at all).",
        help_ja="各ピクセルの loss を画像のアルファ値（潜在のサイズに縮小）で重み付けします（kohya の --alpha_mask）。"
                "透明な部分は学習されません。VAE には background_color で塗った画像を渡し、"
                "アルファのない画像は全体を学習します。完全に透明な正則化画像は loss が 0 になるため使えません。")
    background_color: str = setting("white", "Image Processing", "Background Colour",
                                    "Colour that transparent pixels are put on (name or #rrggbb): "
                                    "the cut-out pictures' background and the transparent class images. "
                                    "For class images trained black, as the old extension did, "
                                    "use class_images_mode=black: "
                                    "black here would blacken your pictures' background too.",
                                    help_ja="透過部分を塗る背景色（色名か #rrggbb）。切り抜いた学習画像の背景にも、"
                                            "透過の正則化画像にも使われます。"
                                            "旧拡張機能のように正則化画像を黒で学習したいときは class_images_mode=black にしてください（ここを black にすると学習画像の背景まで黒くなります）。", step="dataset")
    skip_bad_images: bool = setting(
        False, "Image Processing", "Skip Unreadable Images",
        "Train without pictures that cannot be read (damaged, truncated, not a picture), with a warning "
        "naming each. Off: such a picture stops training before the model loads.",
        help_ja="読み込めない画像（破損・途中で切れたファイル・画像でないもの）を警告付きで除いて学習します。"
                "オフなら、そのような画像があるとモデルを読み込む前に学習を止めます。", learns=False)
    # Aspect-ratio buckets (dbnb.data.buckets): off for SD 1.x, whose guide pads every picture to a
    # square at 512 on purpose. Notebook 02 sets it, beside square_mode, which must agree with it.
    bucketing: bool = setting(
        False, "Image Processing", "Aspect Ratio Bucketing",
        "Train each picture at the bucket closest to its shape (about resolution x resolution pixels, e.g. "
        "448x576 for a tall picture at 512) instead of squaring it: full-body pictures train whole. Each "
        "micro-batch comes from one bucket; center_crop does not apply. Off for SD 1.x by default: the seed pads every picture to a "
        "square (dbnb prep does) and trains at 512x512. Set with square_mode=keep, so prep keeps the pictures' shapes.",
        help_ja="各画像を形の近いバケット（約 resolution × resolution ピクセル。512 なら縦長は 448x576 など）で学習し、"
                "正方形にしません。全身の縦長画像もそのまま学習できます。ミニバッチは 1 つのバケットから作ります（center_crop は使いません）。"
                "SD 1.x では既定でオフ: ガイドは画像を正方形に余白を足して 512x512 で学習します（dbnb prep もそうします）。"
                "前処理で形を保つには square_mode=keep と一緒に使います。",
        step="dataset")
    bucket_min_side: int = setting(
        0, "Image Processing", "Bucket Min Side",
        "With bucketing: the shortest side a bucket may have, in pixels. 0: half the resolution (256 at 512).",
        help_ja="bucketing のとき、バケットの短い辺の最小値（ピクセル）。0: resolution の半分（512 なら 256）。",
        minimum=0)
    bucket_max_side: int = setting(
        0, "Image Processing", "Bucket Max Side",
        "With bucketing: the longest side a bucket may have, in pixels. 0: twice the resolution (1024 at 512).",
        help_ja="bucketing のとき、バケットの長い辺の最大値（ピクセル）。0: resolution の 2 倍（512 なら 1024）。",
        minimum=0)
    bucket_upscale_limit: float = setting(
        2.0, "Image Processing", "Bucket Upscale Limit",
        "With bucketing: the most a picture is enlarged to fill its bucket; a smaller picture gets a smaller "
        "bucket of the same shape instead. 1: never enlarge (kohya's bucket_no_upscale).",
        help_ja="bucketing のとき、画像をバケットに合わせて拡大する最大倍率。これより小さい画像は同じ形の小さいバケットに"
                "入ります。1: 拡大しない（kohya の bucket_no_upscale）。", minimum=1)
