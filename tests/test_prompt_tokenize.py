import json

import pytest

from qwen_cls import prompt as P
from qwen_cls import tokenization as T
from qwen_cls.model_builds.tiny import qwen_tokenizer_dir

LONG = "北京时间昨晚，国家航天局宣布新一代运载火箭发射成功，卫星顺利进入预定轨道。" * 40
ROWS = {
    "text": [LONG, "球队夺冠。"],
    "category": [["Military", "Space", "Enviornment"], ["Sports", "Art"]],
    "output": ["Space", "Sports"],
}


@pytest.fixture(params=["qwen2", "gemma3"])
def any_tokenizer(request):
    """Each model family's tokenizer in turn: the tiny Qwen2's and Gemma 3's."""
    return request.getfixturevalue("tokenizer" if request.param == "qwen2" else "gemma_tokenizer")


@pytest.fixture(scope="module")
def vocab():
    """The tokenizer's vocabulary file itself, to work token ids out by hand."""
    folder = qwen_tokenizer_dir()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab.update({v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()})
    return vocab


def test_prompt_is_the_recipes_chatml(tokenizer):
    text, cats = "火箭发射", ["Military", "Space"]
    hand_built = (
        f"<|im_start|>system\n{P.SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n文本:{text},分类选项列表:['Military', 'Space']<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert P.render_prompt(tokenizer, text, cats) == hand_built


def test_special_and_label_token_ids_by_hand(tokenizer, vocab):
    assert T.end_id(tokenizer) == vocab["<|im_end|>"] == 151645
    assert T.label_ids(tokenizer, "Military") == [vocab["Military"]]
    # "Enviornment" (the dataset's spelling) is not one word of the vocabulary: BPE splits it.
    assert "Enviornment" not in vocab
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in T.label_ids(tokenizer, "Enviornment")]
    assert "".join(pieces) == "Enviornment" and len(pieces) > 1


def test_training_prompt_tokens_equal_inference_prompt_tokens(any_tokenizer):
    tokenizer = any_tokenizer
    batch = T.process_batch(ROWS, tokenizer, max_length=512)
    inference = T.encode_prompts(tokenizer, ROWS["text"], ROWS["category"], 512)
    for i in range(2):
        n_prompt = batch["labels"][i].count(T.IGNORE_INDEX)
        assert batch["input_ids"][i][:n_prompt] == inference[i]
    # The short row is not truncated: its prompt is exactly the chat template's tokens.
    messages = P.build_messages(ROWS["text"][1], ROWS["category"][1])
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inference[1] == templated["input_ids"]
    # The long row is truncated: its prompt is the chat template's tokens for the text it kept, found by
    # decoding the training prompt (not from the truncation code), templated afresh.
    n_prompt = batch["labels"][0].count(T.IGNORE_INDEX)
    train_prompt = batch["input_ids"][0][:n_prompt]
    untruncated = T.encode_prompts(tokenizer, ROWS["text"][:1], ROWS["category"][:1], 100_000)[0]
    assert batch["text_truncated"][0] and len(train_prompt) < len(untruncated)
    kept = tokenizer.decode(train_prompt).split("文本:", 1)[1].split(",分类选项列表:", 1)[0]
    assert 0 < len(kept) < len(LONG) and LONG.startswith(kept)
    messages = P.build_messages(kept, ROWS["category"][0])
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert templated["input_ids"] == train_prompt
    # After the prompt come exactly the answer's tokens and the family's end-of-turn token.
    for i, answer in enumerate(ROWS["output"]):
        n_prompt = batch["labels"][i].count(T.IGNORE_INDEX)
        assert batch["input_ids"][i][n_prompt:] == T.label_ids(tokenizer, answer) + [T.end_id(tokenizer)]
    assert tokenizer.convert_ids_to_tokens(T.end_id(tokenizer)) == P.chat_family(tokenizer).end_of_turn


def test_chat_family_by_tokenizer_config_or_name(tokenizer, gemma_tokenizer):
    assert P.chat_family(tokenizer) is P.QWEN2_FAMILY and P.END_OF_TURN == "<|im_end|>"
    assert P.chat_family(gemma_tokenizer) is P.GEMMA_FAMILY
    assert P.chat_family("qwen2") is P.QWEN2_FAMILY and P.chat_family("gemma3_text") is P.GEMMA_FAMILY
    with pytest.raises(ValueError, match="no chat family for model type 'llama'"):
        P.chat_family("llama")


def test_truncation_shortens_the_text_only(tokenizer):
    max_length = 120
    batch = T.process_batch(ROWS, tokenizer, max_length=max_length)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    space = T.label_ids(tokenizer, "Space")
    assert len(ids) <= max_length
    # Supervision survives: the answer tokens and <|im_end|> close the row, and only they carry labels.
    assert ids[-len(space) - 1:] == space + [151645]
    assert [t for t in labels if t != T.IGNORE_INDEX] == space + [151645]
    decoded = tokenizer.decode(ids)
    assert decoded.endswith(",分类选项列表:['Military', 'Space', 'Enviornment']<|im_end|>\n"
                            "<|im_start|>assistant\nSpace<|im_end|>")
    kept = decoded.split("文本:")[1].split(",分类选项列表:")[0]
    assert 20 < len(kept) < len(LONG) and LONG.startswith(kept)
    # Room is reserved for the longest candidate: prompt + longest + end fits.
    longest = max(len(T.label_ids(tokenizer, c)) for c in ROWS["category"][0])
    assert labels.count(T.IGNORE_INDEX) + longest + 1 <= max_length
    assert batch["text_truncated"] == [True, False]


def test_recipe_tail_cut_report_matches_a_hand_count(tokenizer):
    import datasets

    max_length = 120
    tokenized = T.tokenize_dataset(datasets.Dataset.from_dict(ROWS), tokenizer, max_length)
    # The blog: full prompt + answer + end, then [:max_length].
    full = [P.render_prompt(tokenizer, t, c) for t, c in zip(ROWS["text"], ROWS["category"])]
    lengths = [len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in full]
    assert lengths[0] > max_length > lengths[1] + 2  # row 0 loses its whole answer under the blog's cut
    report = T.truncation_report(tokenized)
    assert report == {"rows": 2, "text_truncated": 1, "recipe_answer_cut": 1, "recipe_answer_gone": 1,
                      "max_length_seen": max(len(x) for x in tokenized["input_ids"])}
    assert report["max_length_seen"] <= max_length


def test_too_small_max_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="raise max_length"):
        T.encode_prompts(tokenizer, [LONG], [["Military", "Space"]], max_length=40)


def test_clipping_long_texts_before_encoding_changes_nothing(tokenizer, monkeypatch):
    rows = {"text": [LONG * 3, LONG[:300], "短"], "category": ROWS["category"] + [["Art", "History"]],
            "output": ["Space", "Sports", "Art"]}
    assert len(rows["text"][0]) > T.CHARS_PER_TOKEN_BOUND * 120  # row 0 is clipped first at max_length 120
    clipped = T.process_batch(rows, tokenizer, max_length=120)
    monkeypatch.setattr(T, "CHARS_PER_TOKEN_BOUND", 10**9)  # encode every text whole
    whole = T.process_batch(rows, tokenizer, max_length=120)
    for key in ("input_ids", "labels", "text_truncated", "recipe_answer_cut", "recipe_answer_gone"):
        assert clipped[key] == whole[key], key
