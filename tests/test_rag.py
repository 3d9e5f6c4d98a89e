"""Retrieval (BM25 over jieba words), the retrieval vote, RAG prompts and their answer-preserving truncation.

``tokenizer`` and ``tiny_dir`` are the session fixtures of ``conftest.py``.
"""

import json
import math

import pytest

from qwen_cls.prompt import (
    EXAMPLE_CHARS,
    SYSTEM_PROMPT,
    build_messages,
    build_rag_messages,
    render_prompt,
    render_rag_prompt,
    user_message,
)
from qwen_cls.rag import Neighbour, Retriever, as_examples, retrieval_vote, segment, vote_weights
from qwen_cls.tokenization import answer_reserve, encode_prompts, end_id, label_ids, process_batch

FRUIT = [
    {"text": "apple banana", "output": "Pome"},
    {"text": "apple apple cherry", "output": "Drupe"},
    {"text": "durian elderberry fig", "output": "Berry"},
    {"text": "grape", "output": "Berry"},
]


def bm25_lucene(query, docs, k1=1.5, b=0.75):
    """BM25 (Lucene idf, Robertson tf) written out by hand, for the scores bm25s must reproduce."""
    n, avg = len(docs), sum(len(d) for d in docs) / len(docs)
    scores = []
    for doc in docs:
        total = 0.0
        for term in set(query):
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avg))
        scores.append(total)
    return scores


@pytest.fixture(scope="module")
def fruit():
    return Retriever.build(FRUIT)


def test_segment_uses_jieba_words_and_drops_punctuation():
    assert segment("我爱北京天安门！") == ["我", "爱", "北京", "天安门"]
    assert segment("Hello, World 2024.") == ["hello", "world", "2024"]
    assert segment("abcdef", max_chars=3) == ["abc"]


def test_retrieve_returns_hand_computed_bm25_neighbours(fruit):
    expected = bm25_lucene(["apple", "cherry"], [d["text"].split() for d in FRUIT])
    # by hand: d1 = ln2 * 2/3.875 + ln(10/3) * 1/2.875 = 0.7765, d0 = ln2 * 1/2.375 = 0.2919, d2 = d3 = 0
    assert expected[1] == pytest.approx(0.776533, abs=1e-5) and expected[0] == pytest.approx(0.291851, abs=1e-5)
    got = fruit.retrieve("Apple cherry!", k=3)
    assert [n.index for n in got] == [1, 0]  # rows sharing no word are never neighbours
    assert [n.label for n in got] == ["Drupe", "Pome"]
    assert [n.score for n in got] == pytest.approx([expected[1], expected[0]], rel=1e-5)


def test_query_never_retrieves_itself_or_a_duplicate():
    rows = FRUIT + [{"text": "  apple   banana ", "output": "Pome"}]  # row 4: row 0 with other whitespace
    retriever = Retriever.build(rows)
    for query in ("apple banana", "apple\tbanana\n"):
        got = retriever.retrieve(query, k=5)
        assert [n.index for n in got] == [1]  # rows 0 and 4 are the query's duplicates
    assert [n.index for n in retriever.retrieve("apple cherry", k=5, exclude=1)] == [0]
    batch = retriever.retrieve_batch(["apple cherry", "grape fig"], k=5, exclude=[[1], [3]])
    assert [[n.index for n in row] for row in batch] == [[0], [2]]


def test_repeated_corpus_text_is_returned_once():
    rows = [{"text": "apple cherry", "output": "Drupe"}, {"text": "apple  cherry", "output": "Drupe"},
            {"text": "apple kiwi", "output": "Berry"}, {"text": "melon", "output": "Melon"}]
    got = Retriever.build(rows).retrieve("cherry apple pie", k=3)
    assert [n.index for n in got] == [0, 2]


def test_vote_is_score_weighted_and_restricted_to_candidates():
    neighbours = [Neighbour(0, "", "Art", 3.0), Neighbour(1, "", "Space", 10.0), Neighbour(2, "", "Sports", 2.0),
                  Neighbour(3, "", "Sports", 1.5)]
    assert vote_weights(neighbours, ["Art", "Sports"]) == {"Art": 3.0, "Sports": 3.5}
    assert retrieval_vote(neighbours, ["Art", "Sports"]) == "Sports"  # 3.5 > 3.0; Space (10.0) is no candidate
    assert retrieval_vote(neighbours, ["Space", "Art"]) == "Space"
    assert retrieval_vote(neighbours, ["Law", "Medical"]) == "Law"  # no vote at all: alphabetical, not list order
    assert retrieval_vote(neighbours, ["Medical", "Law"]) == "Law"
    assert retrieval_vote(neighbours, ["Medical", "Law"], prior={"Medical": 5, "Law": 2}) == "Medical"


def test_vote_tie_goes_to_the_better_ranked_neighbour():
    tied = [Neighbour(0, "", "B", 2.0), Neighbour(1, "", "A", 1.0), Neighbour(2, "", "A", 1.0)]
    assert retrieval_vote(tied, ["A", "B"]) == "B"
    assert retrieval_vote(list(reversed(tied)), ["B", "A"]) == "A"


def test_save_and_load_round_trip(fruit, tmp_path):
    folder = fruit.save(tmp_path / "retriever")
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": r["text"], "label": r["output"]} for r in FRUIT]
    meta = json.loads((folder / "retriever.json").read_text(encoding="utf-8"))
    assert meta["rows"] == 4 and meta["labels"] == {"Berry": 2, "Pome": 1, "Drupe": 1}
    loaded = Retriever.load(folder)
    assert loaded.retrieve("apple cherry", k=3) == fruit.retrieve("apple cherry", k=3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_rag_messages_put_shortened_examples_ahead_of_the_plain_query():
    long_text = "中" * (EXAMPLE_CHARS + 30)
    examples = [{"text": long_text, "label": "Art"}, ("乙  丙", "Sports")]
    system, user = build_rag_messages("新闻正文", ["Art", "Sports"], examples)
    assert system == build_messages("新闻正文", ["Art", "Sports"])[0] == {"role": "system", "content": SYSTEM_PROMPT}
    lines = user["content"].split("\n")
    assert lines[1] == f"示例1 文本:{'中' * EXAMPLE_CHARS},分类:Art"
    assert lines[2] == "示例2 文本:乙 丙,分类:Sports"
    assert lines[-1] == user_message("新闻正文", ["Art", "Sports"]) == "文本:新闻正文,分类选项列表:['Art', 'Sports']"
    neighbours = [Neighbour(7, "乙 丙", "Sports", 1.0)]
    assert as_examples(neighbours) == [{"text": "乙 丙", "label": "Sports"}]
    expected = build_rag_messages("x", ["A", "B"], as_examples(neighbours))
    assert build_rag_messages("x", ["A", "B"], neighbours) == expected


def test_rag_truncation_keeps_candidates_labels_answer_and_end(tokenizer):
    category = ["Agriculture", "Economy", "Sports"]
    query = "国足在世界杯预选赛中以二比零击败对手，球迷欢呼。" * 40
    examples = [{"text": "央行宣布下调存款准备金率，股市大涨。" * 20, "label": "Economy"},
                {"text": "农业部发布春耕生产指导意见。" * 20, "label": "Agriculture"},
                {"text": "篮球联赛总决赛今晚开打。" * 20, "label": "Sports"}]
    reserve = max(len(label_ids(tokenizer, c)) for c in category) + 1
    assert answer_reserve(tokenizer, category) == reserve
    kept_examples = []
    for max_length in (120, 160, 256, 384):
        ids = encode_prompts(tokenizer, [query], [category], max_length, examples=[examples])[0]
        assert len(ids) + reserve <= max_length
        assert len(ids) + reserve >= max_length - 4  # the room is used, not wasted
        prompt = tokenizer.decode(ids)
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert f"分类选项列表:{category}<|im_end|>" in prompt  # the candidate list is whole
        assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
        shown = prompt.count("\n示例")
        assert [f"分类:{e['label']}" in prompt for e in examples] == [True] * shown + [False] * (3 - shown)
        kept_examples.append(shown)
    # more room buys more examples
    assert kept_examples == sorted(kept_examples) and kept_examples[0] < 3 and kept_examples[-1] == 3

    batch = {"text": [query], "category": [category], "output": ["Sports"], "examples": [examples]}
    row = process_batch(batch, tokenizer, 200)
    answer = label_ids(tokenizer, "Sports") + [end_id(tokenizer)]
    assert row["length"][0] <= 200 and row["input_ids"][0][-len(answer):] == answer
    assert [t for t in row["labels"][0] if t != -100] == answer
    assert row["text_truncated"] == [True]


def test_short_rag_prompt_is_not_cut_and_no_examples_means_the_plain_prompt(tokenizer):
    examples = [{"text": "篮球联赛总决赛今晚开打", "label": "Sports"}]
    ids = encode_prompts(tokenizer, ["短新闻"], [["Art", "Sports"]], 384, examples=[examples])[0]
    assert tokenizer.decode(ids) == render_rag_prompt(tokenizer, "短新闻", ["Art", "Sports"], examples)
    long_text = "国足在世界杯预选赛中以二比零击败对手。" * 40
    for text in ("短新闻", long_text):
        plain = encode_prompts(tokenizer, [text], [["Art", "Sports"]], 128)
        assert encode_prompts(tokenizer, [text], [["Art", "Sports"]], 128, examples=[[]]) == plain
    assert render_rag_prompt(tokenizer, "x", ["A", "B"], []) == render_prompt(tokenizer, "x", ["A", "B"])


def test_scoring_passes_examples_through(tiny_dir):
    from _reference import score_candidates_reference

    from qwen_cls.evaluate import score_candidates
    from qwen_cls.model import load_model

    model, tok = load_model(tiny_dir, device="cpu")
    rows = [{"text": "国足击败对手。" * 30, "category": ["Sports", "Economy"]},
            {"text": "股市大涨", "category": ["Economy", "Sports", "Art"]}]
    examples = [[{"text": "篮球联赛总决赛今晚开打。" * 10, "label": "Sports"}],
                [{"text": "央行下调准备金率", "label": "Economy"}, {"text": "画展开幕", "label": "Art"}]]
    fast = score_candidates(model, tok, rows, max_length=128, batch_size=2, examples=examples)
    slow = score_candidates_reference(model, tok, rows, max_length=128, examples=examples)
    plain = score_candidates(model, tok, rows, max_length=128, batch_size=2)
    for f, s, p in zip(fast, slow, plain):
        assert f.prediction == s.prediction
        assert list(f.scores.values()) == pytest.approx(list(s.scores.values()), abs=1e-3)
        assert f.scores != p.scores  # the examples really reached the model
