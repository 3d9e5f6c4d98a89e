"""The exercises of notebooks 05 and 06, their expected values computed by the other methods on the rows 05 and 06
compare: 05.1 retrieval-vote accuracy at k = 1 and 10, 05.2 test rows among a leaky index's neighbours, 05.3 the rows
RAG examples fixed and broke; 06.1 TF-IDF on words and on characters, 06.2 on half the training rows
(:func:`tfidf_accuracy`: 06's ``tfidf_logreg``), 06.3 the saved sequence-classification head.
:mod:`qwen_cls.exercises` checks them.

Taught in: 05, 06
"""

from __future__ import annotations

import json
import math

from .exercises_base import (
    NotYet,
    accuracy_of,
    adapter_shapes,
    as_integer,
    as_number,
    as_pair,
    compared_test_rows,
    equal_to_3_places,
    exercise,
    run_file,
    run_json,
    run_rows,
    wrong_pair,
)
from .files import read_jsonl

# ---------------------------------------------------------------------------------------------------------------
# 05 RAG


@exercise("05.1")
def _vote_at_k_1_and_10(answer, *, out_dir, **_):
    """(retrieval-vote accuracy with k=1, with k=10) on 05's test rows, from the saved retriever."""
    from .rag import Retriever, retrieval_vote

    at_1, at_10 = (as_number(v, "accuracy") for v in as_pair(answer, "answer_1"))
    retriever = Retriever.load(run_file(out_dir, "retriever"))
    rows = compared_test_rows(out_dir)
    y_true = [r["output"] for r in rows]

    def vote(k: int) -> float:
        found = retriever.retrieve_batch([r["text"] for r in rows], k)
        return accuracy_of(y_true, [retrieval_vote(f, r["category"], prior=retriever.label_counts)
                                  for f, r in zip(found, rows)])

    expected = (vote(1), vote(10))
    if equal_to_3_places(at_1, expected[0]) and equal_to_3_places(at_10, expected[1]):
        used = run_json(out_dir, "rag_metrics.json")["retrieval_vote"]["accuracy"]
        return (f"k = 1: {expected[0]:.3f}, k = 10: {expected[1]:.3f} (这次运行的 rag_k: {used:.3f})。"
                "k = 1 只听最相似的一条; k 大一些能纠正个别错误的邻居, 但靠后的邻居越来越不像查询 "
                "(按 BM25 得分加权让它们分量更小)。"
                "RAG prompt 的长度固定: 例子越多, 留给查询正文的 token 越少。")
    raise wrong_pair((at_1, at_10), expected, ("k = 1", "k = 10"),
                      "found = retriever.retrieve_batch([row['text'] for row in test_rows], k), 再用第 2 "
                      "节的 retrieval_vote(..., prior=retriever.label_counts) 和 classification_metrics")


@exercise("05.2")
def _test_rows_among_neighbours(answer, *, out_dir, k=3, **_):
    """Test rows with at least one other test row among their ``k`` neighbours (``retrieve_batch``, which drops
    only the query and its duplicates) in an index of train + test rows."""
    from .rag import Retriever, retrieval_vote

    n = as_integer(answer, "answer_2")
    train, rows = run_rows(out_dir, "train"), compared_test_rows(out_dir)
    leaky = Retriever.build(train + rows)
    found = leaky.retrieve_batch([r["text"] for r in rows], k)
    from_test = [sum(f.index >= len(train) for f in row_found) for row_found in found]
    expected = sum(c > 0 for c in from_test)
    if n == expected:
        leaked = accuracy_of([r["output"] for r in rows], [retrieval_vote(f, r["category"], prior=leaky.label_counts)
                                                         for f, r in zip(found, rows)])
        honest = run_json(out_dir, "rag_metrics.json")["retrieval_vote"]["accuracy"]
        return (f"{n}/{len(rows)} 行的 {k} 个邻居里有别的测试行 (共 {sum(from_test)} 个), 它们带着测试集的标签投票: "
                f"检索投票 accuracy {leaked:.3f} (诚实的索引 {honest:.3f})。规则只排除查询自己和它的重复, 挡不住"
                "其他测试行: 检索库只能来自训练行, 否则评估就用上了测试集的答案。")
    if n == 0 and expected:
        raise NotYet("规则只排除查询自己 (和文本相同的行), 不排除其他测试行: 看每个邻居的行号 n.index, "
                     "行号 ≥ len(train_rows) 的来自测试行")
    if n == sum(from_test) and n != expected:
        raise NotYet("这是来自测试行的邻居总数; 要的是至少有一个这样的邻居的测试行数")
    if n == len(rows) and expected < n:
        raise NotYet("不是每一行: 逐行看 k 个邻居的行号 (n.index ≥ len(train_rows) 的来自测试行)")
    raise NotYet("leaky = Retriever.build(train_rows + test_rows); found = leaky.retrieve_batch(texts, rag_k); "
                 "数 any(n.index >= len(train_rows) for n in row_found) 的行")


@exercise("05.3")
def _rows_rag_fixed_and_broke(answer, *, out_dir, **_):
    """(rows ``lora_rag`` gets right and ``lora`` wrong, rows ``lora`` gets right and ``lora_rag`` wrong) in
    ``rag_predictions.jsonl``."""
    fixed, broke = (as_integer(v, "行数") for v in as_pair(answer, "answer_3"))
    rows = read_jsonl(run_file(out_dir, "rag_predictions.jsonl"))
    right = {m: [r["predictions"][m] == r["output"] for r in rows] for m in ("lora", "lora_rag")}
    expected = (sum(b and not a for a, b in zip(right["lora"], right["lora_rag"])),
                sum(a and not b for a, b in zip(right["lora"], right["lora_rag"])))
    if (fixed, broke) == expected:
        changed = sum(r["predictions"]["lora"] != r["predictions"]["lora_rag"] for r in rows)
        tiny = run_json(out_dir, "run_config.json")["base_model"] == "tiny"
        return (f"例子改对 {expected[0]} 行, 改错 {expected[1]} 行 (预测变了的 {changed} 行里, 其余两边都错): "
                f"lora_rag − lora = ({expected[0]} − {expected[1]}) / {len(rows)} = "
                f"{(expected[0] - expected[1]) / len(rows):+.3f}。"
                + (" 这是 tiny 随机模型: 这些变化只是噪声。" if tiny else
                   " LoRA 只见过普通 prompt: RAG prompt 对它是新格式, 例子里邻居的标签可能把它带偏。"))
    if (broke, fixed) == expected and fixed != broke:
        raise NotYet("顺序反了: (lora_rag 对而 lora 错的行数, lora 对而 lora_rag 错的行数)")
    changed = sum(r["predictions"]["lora"] != r["predictions"]["lora_rag"] for r in rows)
    if changed in (fixed, broke) and changed not in expected:
        raise NotYet(f"{changed} 是预测变了的行数; 其中有的行两边都错: 只数一边对、一边错的行")
    raise NotYet("读 out_dir / 'rag_predictions.jsonl': 每行 predictions['lora'] 和 predictions['lora_rag'] "
                 "分别和 output 比较, 数 (lora_rag 对且 lora 错, lora 对且 lora_rag 错)")


# ---------------------------------------------------------------------------------------------------------------
# 06 approaches


def tfidf_accuracy(train_rows, test_rows, vectorizer) -> float:
    """06's ``tfidf_logreg`` with another vectorizer (or fewer training rows), restricted to the candidates."""
    from .approaches import restricted_rows, tfidf_logreg

    pipe = tfidf_logreg(vectorizer)
    pipe.fit([r["text"] for r in train_rows], [r["output"] for r in train_rows])
    scored = restricted_rows(pipe.predict_log_proba([r["text"] for r in test_rows]), list(pipe.classes_), test_rows)
    return accuracy_of([r["output"] for r in test_rows], [s.prediction for s in scored])


@exercise("06.1")
def _tfidf_variants(answer, *, out_dir, **_):
    """(accuracy with jieba words (1, 1), with characters (1, 2)) of ``tfidf_logreg`` on 06's rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    words, chars = (as_number(v, "accuracy") for v in as_pair(answer, "answer_1"))
    train, test = run_rows(out_dir, "train"), compared_test_rows(out_dir)
    from .approaches import word_vectorizer

    expected = (tfidf_accuracy(train, test, word_vectorizer((1, 1))),
                tfidf_accuracy(train, test, TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)))
    if equal_to_3_places(words, expected[0]) and equal_to_3_places(chars, expected[1]):
        base = run_json(out_dir, "approaches.json")["tfidf_logreg"]["accuracy"]
        return (f"jieba 词 (1, 2): {base:.3f}, 只用词 (1, 1): {expected[0]:.3f}, 按字 (1, 2): {expected[1]:.3f}。"
                "两个相邻的汉字大多就是一个词或词的一部分, 不需要分词器; jieba 切错的词、没见过的人名公司名在字的层面"
                "仍和训练行有重叠。"
                + ("合成的 tiny 样例上什么都分得开, 差别要在真实的 THUCNews 上看 (gemma3-270m profile)。"
                   if run_json(out_dir, "run_config.json")["base_model"] == "tiny" else ""))
    raise wrong_pair((words, chars), expected, ("jieba 词 (1, 1)", "按字 (1, 2)"),
                      "除了 TfidfVectorizer 的参数, 其余和第 2 节相同 (sublinear_tf=True, "
                      "LogisticRegression(C=10.0, max_iter=1000), restricted_rows 只在候选里选)")


@exercise("06.2")
def _tfidf_on_half(answer, *, out_dir, **_):
    """``tfidf_logreg``'s accuracy trained on the first half of the training rows."""
    value = as_number(answer, "answer_2")
    train, test = run_rows(out_dir, "train"), compared_test_rows(out_dir)
    from .approaches import word_vectorizer

    expected = tfidf_accuracy(train[:len(train) // 2], test, word_vectorizer((1, 2)))
    full = run_json(out_dir, "approaches.json")["tfidf_logreg"]["accuracy"]
    if equal_to_3_places(value, expected):
        return (f"一半的训练行 ({len(train) // 2}): {expected:.3f}, 全部 ({len(train)}): {full:.3f}, 差 "
                f"{full - expected:+.3f} (全部 − 一半)。TF-IDF 只认识训练行里出现过的词; 预训练模型 (seq_cls_lora) "
                "对没见过的词也有表示, 数据少时通常掉得少: 标注数据越少, 预训练知识越重要。")
    if equal_to_3_places(value, full) and not equal_to_3_places(full, expected):
        raise NotYet("这是用全部训练行的 accuracy (approaches.json); 要只用 train_rows[:len(train_rows) // 2] 重新训练")
    raise NotYet("和第 2 节相同的 make_pipeline(TfidfVectorizer(...), LogisticRegression(...)), 只在 "
                 "train_rows[:len(train_rows) // 2] 上 fit, 再在同样的 test_rows 上算 accuracy")


@exercise("06.3")
def _saved_head(answer, *, out_dir, **_):
    """(parameters of the module saved whole beside the LoRA weights, parameters of the LoRA weights) in
    ``seq_cls/adapter_model.safetensors``."""
    from .approaches import SEQ_CLS_HEAD

    head_count, lora_count = (as_integer(v, "参数个数") for v in as_pair(answer, "answer_3"))
    folder = run_file(out_dir, "seq_cls")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    shapes = adapter_shapes(folder)
    head = {k: s for k, s in shapes.items() if f".{SEQ_CLS_HEAD}." in k and "lora_" not in k}
    expected = sum(math.prod(s) for s in head.values())
    lora = sum(math.prod(s) for k, s in shapes.items() if "lora_" in k)
    if (head_count, lora_count) == (expected, lora) and SEQ_CLS_HEAD in (config.get("modules_to_save") or []):
        shape = " + ".join(str(s) for s in head.values())
        return (f"{SEQ_CLS_HEAD!r}: {expected:,} 个参数 ({shape}, 标签数 × hidden_size), 和 {lora:,} 个 LoRA 参数"
                f" 一起保存 (两者之和 {expected + lora:,} 就是 print_trainable_parameters 的 trainable params)。"
                "忘了它 (task_type=None, 没有 modules_to_save), 这些参数不训练也不保存; "
                "重新加载时基座新建一个不同的随机头, 预测和随机猜差不多, 日志里只有一行 score.weight | MISSING "
                "(正确保存时也有这一行), 所以 save_seq_cls 在保存前检查 modules_to_save, 06 保存后重新加载并比较预测。")
    if (head_count, lora_count) == (lora, expected) and expected != lora:
        raise NotYet("顺序反了: (头的参数个数, LoRA 的参数个数)")
    if expected + lora in (head_count, lora_count):
        raise NotYet(f"{expected + lora:,} 是所有保存的 (可训练的) 参数: 把名字含 lora_ 的张量和不含的分开数")
    if head_count != expected:
        raise NotYet("头的参数个数不对: 用 safetensors.safe_open 列出 seq_cls/adapter_model.safetensors 里的张量, "
                     "名字不含 lora_A / lora_B 的那个是完整保存的模块, 把它的形状相乘 (标签数 × hidden_size)")
    raise NotYet("LoRA 的参数个数不对: 名字含 lora_ 的张量, 形状相乘再求和")
