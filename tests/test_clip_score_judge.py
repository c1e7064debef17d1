"""The clip_score judge on a tiny CLIP built from a config (nothing downloaded)."""

import torch

from t2vu.core import plugins
from t2vu.core.evaluate import EvalPrompt, EvalResult, generic_summary

torch.set_num_threads(1)


def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + [t for ch in letters for t in (ch, ch + "</w>")]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tokens), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, tokenizer


def test_clip_score_is_the_mean_clipped_cosine_over_frames(tmp_path):
    from transformers import CLIPImageProcessor

    model, tokenizer = tiny_clip(tmp_path / "clip")
    judge = plugins.get_registry().get("evaluator", "clip_score").build(
        {"model_path": str(tmp_path / "clip"), "frames": "all", "device": "cpu", "batch_size": 2})
    g = torch.Generator().manual_seed(1)
    video = torch.rand((3, 3, 40, 48), generator=g)
    got = judge.score(video, "a dog")
    # by hand: every frame through the processor and the model
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    frames = [(f.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy() for f in video]
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(["a dog"], return_tensors="pt"))
        image = model.get_image_features(pixel_values=processor(images=frames, return_tensors="pt")["pixel_values"])
        text = text if torch.is_tensor(text) else text.pooler_output
        image = image if torch.is_tensor(image) else image.pooler_output
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert abs(got - float((100 * cos).clamp(min=0).mean())) < 1e-3
    assert 0.0 <= got <= 100.0 and judge.score(video, "a dog") == got  # deterministic
    assert judge.score(video, "zebra stripes") != got  # the prompt matters


def test_eval_summary_averages_the_scores():
    item = EvalPrompt("p")
    rows = [EvalResult(item, {}, {}, 0.0, scores_before={"clip_score": 30.0}, scores_after={"clip_score": 20.0}),
            EvalResult(item, {}, {}, 0.0, scores_before={"clip_score": 10.0}, scores_after={"clip_score": 20.0})]
    assert generic_summary(rows)["clip_score"] == {"before": 20.0, "after": 20.0, "n": 2}


def test_a_missing_clip_folder_is_named(tmp_path):
    import pytest

    from t2vu.core.errors import T2VUError

    judge = plugins.get_registry().get("evaluator", "clip_score").build({"model_path": str(tmp_path / "none")})
    with pytest.raises(T2VUError, match="not a CLIP model folder"):
        judge.score(torch.zeros(1, 3, 8, 8), "a dog")
