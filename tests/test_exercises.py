"""The self-checking exercises of notebooks 01-06 (``qwen_cls.exercises``).

Each notebook lists its exercises in a "## 练习" cell followed by an answer cell and a check cell per exercise.
On two runs, every check says right for the answer the solution's code computes (the code block of
``solutions/NN_*.md`` that assigns ``answer_K``, run in the notebook's objects rebuilt from the run), not yet with a
hint for a wrong answer, and names its likely slips: the tiny chain run, and a run folder of the default profile's
shape (``_default_run``: real THUCNews headlines, Gemma's tokenizer at max_length 128, its 10 labels, no training).
An unanswered exercise prints "not answered yet" in the executed notebooks of ``qwen-cls run``.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import nbformat
import pytest

from qwen_cls.exercises import CHECKS, RIGHT, UNANSWERED, WRONG, check, verdict

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
CHAPTERS = ["01_data_conversion", "02_tokenization", "03_lora_training", "04_evaluation", "05_rag", "06_approaches"]


def exercises_cell(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## 练习" in c.source)


def listed_exercises(nb) -> list[int]:
    """The numbers of the exercises the exercises cell lists (lines starting with ``K.``)."""
    return [int(m.group(1)) for line in nb.cells[exercises_cell(nb)].source.splitlines()
            if (m := re.match(r"^(\d)\. ", line))]


def check_call(cell_source: str) -> ast.Call:
    calls = [n for n in ast.walk(ast.parse(cell_source)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "check"]
    assert len(calls) == 1, cell_source
    return calls[0]


def check_cells(name: str) -> dict[str, ast.Call]:
    """Exercise id -> the ``check(...)`` call of its check cell."""
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    return {call.args[0].value: call for c in nb.cells[exercises_cell(nb) + 1:]
            if c.cell_type == "code" and "check(" in c.source for call in [check_call(c.source)]}


def solution_code(name: str, k: int) -> str:
    """The python block of the solution's section ``## K.`` that assigns ``answer_K``."""
    text = (NB_DIR / "solutions" / f"{name}.md").read_text(encoding="utf-8")
    section = re.split(r"^## ", text, flags=re.M)[k]
    assert section.startswith(f"{k}."), name
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if f"answer_{k} =" in b]
    assert len(blocks) == 1, f"{name} solution {k}: one code block assigns answer_{k}"
    return blocks[0]


# ---------------------------------------------------------------------------------------------------------------
# The notebooks' cells (no run needed)


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_listed_exercise_has_an_answer_cell_then_a_check_cell(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    numbers = listed_exercises(nb)
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 2, numbers
    after = nb.cells[exercises_cell(nb) + 1:]
    assert len(after) == 2 * len(numbers), f"{name}: an answer and a check cell per exercise, nothing else"
    nn = name[:2]
    for k in numbers:
        answer, checker = after[2 * k - 2], after[2 * k - 1]
        assert answer.cell_type == checker.cell_type == "code"
        assert answer.source.startswith(f"answer_{k} = None  #"), answer.source  # blank until the learner answers
        assert f"answer_{k}" in nb.cells[exercises_cell(nb)].source  # the text says where the answer goes
        call = check_call(checker.source)
        assert call.args[0].value == f"{nn}.{k}" and call.args[1].id == f"answer_{k}", checker.source
        required = {p.name for p in inspect.signature(CHECKS[f"{nn}.{k}"]).parameters.values()
                    if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
        given = {kw.arg for kw in call.keywords}
        assert required <= given, f"{name} {nn}.{k}: the check needs {sorted(required - given)}"
    assert sorted(key for key in CHECKS if key.startswith(f"{nn}.")) == [f"{nn}.{k}" for k in numbers]


@pytest.mark.parametrize("key", sorted(CHECKS))
def test_unanswered_says_so_computes_nothing_and_raises_nothing(key, capsys):
    result = verdict(key, None)  # no context at all: nothing is read or computed
    assert result.status == UNANSWERED and not result
    check(key, None)
    assert "not answered yet" in capsys.readouterr().out


@pytest.mark.parametrize("answer", ["7", True, float("nan"), 2.5, (1,), [1, 2, 3, 4]])
def test_a_malformed_answer_is_a_hint_about_the_format(answer, tmp_path):
    for key in ("01.1", "03.2", "01.3"):  # an integer, a pair, a triple: the format is checked before any file
        result = verdict(key, answer, out_dir=tmp_path, rows=[])
        assert result.status == WRONG and "应该是" in result.text, result


def test_a_missing_run_file_names_the_notebook_that_writes_it(tmp_path):
    result = verdict("04.1", 5, out_dir=tmp_path)
    assert result.status == WRONG and "04_evaluation" in result.text and "predictions.jsonl" in result.text


def test_unknown_exercise_is_refused():
    with pytest.raises(KeyError, match="01.1"):
        verdict("07.1", 1)


# ---------------------------------------------------------------------------------------------------------------
# On a tiny run's files


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The session's tiny chain run (conftest.tiny_run: the committed notebooks, check cells included, 16 training
    and 8 test rows), shared with the other tests that only read a finished chain."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, gemma_dir) -> Path:
    """A run folder of the default profile's shape (gemma3-270m: 800 real THUCNews training headlines, 500 test
    rows, max_length 128, its 10 labels, Gemma's tokenizer and adapter shapes), made without training
    (``_default_run.make_default_run``)."""
    from _default_run import ROOT as _root
    from _default_run import make_default_run

    if not (_root / "data" / "thucnews" / "train.jsonl").is_file():
        pytest.skip("data/thucnews not fetched (make setup)")
    return make_default_run(tmp_path_factory.mktemp("default_shape") / "run")


def cut_length_and_kept(train_rows, tokenizer, max_length):
    """02 section 6: the length the recipe's tail cut is shown at, and per row the answer tokens (answer + end
    token) and how many of them the cut keeps, computed as the notebook computes them."""
    import statistics

    from qwen_cls.prompt import render_prompt
    from qwen_cls.tokenization import end_id, label_ids

    prompt_ids = tokenizer([render_prompt(tokenizer, r["text"], r["category"]) for r in train_rows],
                           add_special_tokens=False)["input_ids"]
    answers = [label_ids(tokenizer, r["output"]) + [end_id(tokenizer)] for r in train_rows]
    full = [len(p) + len(a) for p, a in zip(prompt_ids, answers)]
    empty = tokenizer([render_prompt(tokenizer, "", r["category"]) for r in train_rows],
                      add_special_tokens=False)["input_ids"]
    floor = max(len(ids) + max(len(label_ids(tokenizer, c)) for c in r["category"]) + 1 + 8
                for ids, r in zip(empty, train_rows))
    cut_length = max_length if max(full) > max_length else max(int(statistics.median(full)), floor)
    kept = [sum(t != -100 for t in ([-100] * len(p) + a)[:cut_length]) for p, a in zip(prompt_ids, answers)]
    return cut_length, answers, kept


def build_objects(run: Path) -> dict:
    """The notebooks' objects the solutions use, rebuilt from the run's files: notebook -> namespace."""
    from datasets import load_from_disk
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from qwen_cls.approaches import restricted_rows
    from qwen_cls.chain.templating import notebook_parameters
    from qwen_cls.data import read_raw_rows
    from qwen_cls.evaluate import Scored
    from qwen_cls.files import read_jsonl
    from qwen_cls.metrics import classification_metrics
    from qwen_cls.model import load_model, load_tokenizer, resolve_model
    from qwen_cls.prompt import chat_family
    from qwen_cls.rag import Retriever, retrieval_vote, segment
    from qwen_cls.tokenization import IGNORE_INDEX

    params = json.loads((run / "params.json").read_text(encoding="utf-8"))
    rag_k = params.get("rag_k", ast.literal_eval(notebook_parameters(NB_DIR / "05_rag.ipynb")["rag_k"]))
    read = lambda name: json.loads((run / name).read_text(encoding="utf-8"))  # noqa: E731
    train_rows, all_test = read_jsonl(run / "data" / "train.jsonl"), read_jsonl(run / "data" / "test.jsonl")
    tokenizer = load_tokenizer(resolve_model(params["base_model"]))
    model, _ = load_model(params["base_model"], adapter=str(run / "adapter"))
    predictions = read_jsonl(run / "predictions.jsonl")
    retriever = Retriever.load(run / "retriever")
    compared = all_test[:read("rag_timing.json")["n_test"]]
    y_true = [r["output"] for r in compared]
    found = retriever.retrieve_batch([r["text"] for r in compared], rag_k)
    vote = classification_metrics(y_true, [retrieval_vote(f, r["category"], prior=retriever.label_counts)
                                           for f, r in zip(found, compared)])
    cut_length, answers, kept = cut_length_and_kept(train_rows, tokenizer, params["max_length"])
    common = {"out_dir": run}
    return {
        "01": {**common, "all_train": read_raw_rows(params["train_path"]), "train_rows": train_rows,
               "max_train_samples": params["max_train_samples"], "validation_rows": params["validation_rows"],
               "seed": params["seed"]},
        "02": {**common, "train_rows": train_rows, "tokenizer": tokenizer, "max_length": params["max_length"],
               "longest": max(range(len(train_rows)), key=lambda i: len(train_rows[i]["text"])),
               "tokenized": load_from_disk(str(run / "tokenized" / "train")), "IGNORE_INDEX": IGNORE_INDEX,
               "chat_family": chat_family, "cut_length": cut_length, "answers": answers, "kept": kept},
        "03": {**common, "run_config": read("run_config.json"), "lora_alpha": params["lora_alpha"],
               "lora_layers": [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A],
               "train_dataset": load_from_disk(str(run / "tokenized" / "train"))},
        "04": {**common, "metrics": read("metrics.json") if (run / "metrics.json").is_file() else None,
               "tokenizer": tokenizer, "test_rows": all_test,
               "predictions": [r["prediction"] for r in predictions],
               "scored": [Scored(r["prediction"], r["scores"], r["probabilities"]) for r in predictions]},
        "05": {**common, "train_rows": train_rows, "test_rows": compared, "y_true": y_true, "retriever": retriever,
               "rag_k": rag_k, "vote": vote, "rag_metrics": read("rag_metrics.json"), "Retriever": Retriever,
               "retrieval_vote": retrieval_vote, "classification_metrics": classification_metrics},
        "06": {**common, "train_rows": train_rows, "test_rows": compared, "y_true": y_true, "segment": segment,
               "restricted_rows": restricted_rows, "approaches": read("approaches.json"),
               "make_pipeline": make_pipeline, "TfidfVectorizer": TfidfVectorizer,
               "LogisticRegression": LogisticRegression,
               "seq_cls_dir": run / "seq_cls"},
    }


SHAPES = ["tiny", "gemma3-270m"]


@pytest.fixture(scope="module", params=SHAPES)
def shaped(request) -> tuple[str, dict]:
    """(shape, objects) for the tiny chain run and for the default profile's shape: every check runs on both."""
    run = request.getfixturevalue("run" if request.param == "tiny" else "default_run")
    return request.param, build_objects(run)


@pytest.fixture(scope="module")
def objects(shaped) -> dict:
    return shaped[1]


def solution_answer(key: str, objects: dict, folder: Path, monkeypatch):
    """What the solution's code block assigns to ``answer_K``, run in the notebook's objects."""
    nn, k = key.split(".")
    name = next(c for c in CHAPTERS if c.startswith(nn))
    namespace = dict(objects[nn])
    monkeypatch.chdir(folder)  # 01.2's solution writes bad.jsonl into the working folder
    exec(compile(solution_code(name, int(k)), f"solutions/{name}.md#{k}", "exec"), namespace)
    return namespace[f"answer_{k}"]


def context(key: str, objects: dict) -> dict:
    """The keyword arguments the notebook's check cell passes, evaluated in the notebook's objects."""
    nn = key.split(".")[0]
    call = check_cells(next(c for c in CHAPTERS if c.startswith(nn)))[key]
    return {kw.arg: eval(ast.unparse(kw.value), dict(objects[nn])) for kw in call.keywords}


def wrong_answer(key: str, right):
    """An answer the check must call wrong: the right one, off by a little."""
    if isinstance(right, str):
        return right + "x"
    if isinstance(right, tuple):
        first = right[0] + "x" if isinstance(right[0], str) else right[0] + (1 if isinstance(right[0], int) else 0.25)
        return (first, *right[1:])
    if isinstance(right, int):
        return right + 1
    return right + 0.25 if right < 0.5 else right - 0.25


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(CHECKS))
def test_the_solutions_answer_is_right_and_a_wrong_one_gets_a_hint(key, objects, tmp_path, monkeypatch,
                                                                    capsys):
    answer = solution_answer(key, objects, tmp_path, monkeypatch)
    kwargs = context(key, objects)
    right = verdict(key, answer, **kwargs)
    assert right.status == RIGHT, f"{key}: the solution's answer {answer!r} -> {right}"
    wrong = verdict(key, wrong_answer(key, answer), **kwargs)
    assert wrong.status == WRONG and len(wrong.text) > 10 and wrong.text != right.text, wrong
    capsys.readouterr()  # what the solution's code printed
    check(key, wrong_answer(key, answer), **kwargs)
    assert capsys.readouterr().out.startswith("✗ 还不对 (not yet)")
    malformed = verdict(key, object(), **kwargs)  # a wrong type is a hint about the format, not a traceback
    assert malformed.status == WRONG, malformed


@pytest.mark.slow
def _need(o) -> list[int]:
    """02.1: per training row, prompt (text whole) + longest candidate + end token, sorted."""
    from qwen_cls.prompt import render_prompt
    from qwen_cls.tokenization import label_ids

    tok, rows = o["02"]["tokenizer"], o["02"]["train_rows"]
    ids = tok([render_prompt(tok, r["text"], r["category"]) for r in rows], add_special_tokens=False)["input_ids"]
    return sorted(len(p) + max(len(label_ids(tok, c)) for c in r["category"]) + 1 for p, r in zip(ids, rows))


def _multi_token_answers(o) -> int:
    from qwen_cls.tokenization import label_ids

    return sum(len(label_ids(o["02"]["tokenizer"], r["output"])) > 1 for r in o["02"]["train_rows"])


@pytest.mark.slow
@pytest.mark.parametrize("key, slip, hint", [
    ("01.2", lambda a, o: a.replace(":2:", ":1:"), "第 1 行"),
    ("01.3", lambda a, o: tuple(f(len(r["text"].encode()) for r in o["01"]["train_rows"]) for f in (min, max)), "字节"),
    ("02.1", lambda a, o: _need(o)[-1], "一行都不缩短"),
    ("02.2", lambda a, o: sum(k < len(x) for k, x in zip(o["02"]["kept"], o["02"]["answers"])), "行数"),
    ("02.3", lambda a, o: _multi_token_answers(o), "答案本身"),
    ("03.1", lambda a, o: a / 1e-4 * o["03"]["run_config"]["training"]["learning_rate"], "学习率"),
    ("03.2", lambda a, o: (a[0] // 2, a[1]), "r = 8"),
    ("03.3", lambda a, o: 1 / a, "倒过来"),
    ("04.2", lambda a, o: len(o["04"]["scored"]) - a, "没变"),
    ("05.1", lambda a, o: (a[1], a[0]), "顺序反了"),
    ("05.1", lambda a, o: (a[0], a[1] + 0.1), "k = 10 的不对"),
    ("05.2", lambda a, o: 0, "不排除其他测试行"),
    ("05.3", lambda a, o: (a[1], a[0]), "顺序反了"),
    ("06.1", lambda a, o: (a[1], a[0]), "顺序反了"),
    ("06.1", lambda a, o: (a[0] + 0.1, a[1]), "jieba 词 (1, 1) 的不对"),
    ("06.3", lambda a, o: (a[0] + a[1], a[1]), "所有保存的"),
])
def test_likely_slips_get_their_own_hint(key, slip, hint, objects, tmp_path, monkeypatch):
    answer = solution_answer(key, objects, tmp_path, monkeypatch)
    given = slip(answer, objects)
    if key == "01.3":
        given = (given[0], answer[1], given[1])
    if given == answer:
        pytest.skip(f"{key}: this run's right answer and the slip coincide")
    result = verdict(key, given, **context(key, objects))
    assert result.status == WRONG and hint in result.text, result


@pytest.mark.slow
def test_executed_notebooks_print_not_answered_yet_for_every_exercise(run):
    for name in CHAPTERS:
        nb = nbformat.read(run / "notebooks" / f"{name}.ipynb", as_version=4)
        checks = [c for c in nb.cells[exercises_cell(nb) + 1:] if "check(" in c.source]
        assert len(checks) == len(listed_exercises(nb)), name
        for cell in checks:
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert "… 还没有回答 (not answered yet)" in text and cell.source.split('"')[1] in text, (name, text)


# ---------------------------------------------------------------------------------------------------------------
# Checks that need only raw rows, on the default profile's shape too (issue 32, item 3)


@pytest.mark.parametrize("shape", ["gemma3-270m", "tiny"])
def test_01_1_on_both_profiles_rows_right_and_its_slips(shape, monkeypatch, tmp_path):
    """The default profile's 8000 THUCNews rows (800 training, 300 validation, seed 42) and tiny's 80 sample rows
    (all but 8 training): the solution's answer is right, 0 (the same seed's answer) and all the validation rows
    (the other obvious guess) get their own hints."""
    from qwen_cls.data import read_raw_rows
    from qwen_cls.profiles import PROFILES

    params = PROFILES[shape]
    path = (NB_DIR / params["train_path"]).resolve()
    if not path.is_file():
        pytest.skip(f"{path} not fetched (make setup)")
    namespace = {"all_train": read_raw_rows(path), "max_train_samples": params["max_train_samples"],
                 "validation_rows": params["validation_rows"], "seed": params["seed"]}
    answer = solution_answer("01.1", {"01": namespace}, tmp_path, monkeypatch)
    kwargs = context("01.1", {"01": namespace})
    # about 300 x 800 / 8000 = 30 of the default's validation rows; tiny trains on all but 8, so all 8 can move
    expected = {"gemma3-270m": 29, "tiny": 8}[shape]
    assert answer == expected and verdict("01.1", answer, **kwargs).status == RIGHT
    assert "同一个种子" in verdict("01.1", 0, **kwargs).text
    if shape == "gemma3-270m":  # all 300, the other obvious guess
        assert "不是全部 300 行" in verdict("01.1", 300, **kwargs).text
    assert verdict("01.1", answer - 1, **kwargs).status == WRONG


def test_04_1_counts_rows_lora_fixed_and_names_the_slips(tmp_path):
    """predictions.jsonl of 10 rows: LoRA right on 7, zero-shot right on 5; LoRA fixed 3 rows, broke 1."""
    lora_right = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    zero_right = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]
    rows = []
    for k, (a, b) in enumerate(zip(lora_right, zero_right)):
        rows.append({"text": f"t{k}", "category": ["Sports", "Stocks"], "output": "Sports",
                     "prediction": "Sports" if a else "Stocks",
                     "zero_shot_scores": {"Sports": -1.0, "Stocks": -2.0} if b else {"Sports": -3.0, "Stocks": -0.5}})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    right = verdict("04.1", 3, out_dir=tmp_path)
    assert right.status == RIGHT and "反过来 (LoRA 答错而 zero-shot 答对) 有 1 行" in right.text
    assert "反过来了" in verdict("04.1", 1, out_dir=tmp_path).text
    assert "净增加" in verdict("04.1", 2, out_dir=tmp_path).text
    assert "LoRA 答对的全部行数" in verdict("04.1", 7, out_dir=tmp_path).text
    assert verdict("04.1", 4, out_dir=tmp_path).status == WRONG
