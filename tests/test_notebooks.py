"""The committed notebooks: clean, one plain ``parameters`` cell, defaults = the gemma3-270m profile, workshop kit.

Running them is ``make test``'s nbval step, on copies with the tiny profile injected (``make prepare-nbval``).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest

from qwen_cls.chain.templating import notebook_parameters
from qwen_cls.chapters import NOTEBOOKS, notebooks_dir
from qwen_cls.profiles import COMMITTED_PROFILE, PROFILES

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
ALL_NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
CORE = ("00_check_environment.ipynb", "01_data_conversion.ipynb", "02_tokenization.ipynb", "03_lora_training.ipynb",
        "04_evaluation.ipynb")  # the fine-tuning chain; later notebooks may add parameters of their own


def read(name: str):
    return nbformat.read(NB_DIR / name, as_version=4)


def parameters_cells(nb):
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]


def test_chain_notebooks_exist_and_package_finds_them():
    assert notebooks_dir() == NB_DIR
    assert NOTEBOOKS[:len(CORE)] == CORE
    for name in NOTEBOOKS:
        assert (NB_DIR / name).is_file(), name


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a cell has outputs; clear them before committing"
            assert cell.execution_count is None, f"{name}: execution_count must be null"
        assert "papermill" not in cell.metadata and "execution" not in cell.metadata, name
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells), name
    # nbformat 4.5 cells carry an id; nbformat.read adds missing ones silently, papermill warns on every run
    raw = json.loads((NB_DIR / name).read_text(encoding="utf-8"))
    ids = [cell.get("id") for cell in raw["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), f"{name}: every cell needs its own id"


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_one_parameters_cell_of_plain_literals_then_derived_values(name):
    nb = read(name)
    cells = parameters_cells(nb)
    assert len(cells) == 1, f"{name}: {len(cells)} cells tagged parameters"
    cell = nb.cells[cells[0]]
    tree = ast.parse(cell.source)
    lines = cell.source.splitlines()
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, f"{name}: only NAME = literal lines"
        ast.literal_eval(stmt.value)  # a plain literal, nothing computed
        assert "#" in lines[stmt.lineno - 1], f"{name}: parameter {stmt.targets[0].id} needs a comment"
    names = [stmt.targets[0].id for stmt in tree.body]
    assert list(notebook_parameters(NB_DIR / name)) == names, f"{name}: papermill cannot parse every parameter"
    follower = nb.cells[cells[0] + 1]
    assert follower.cell_type == "code", f"{name}: a cell of derived values follows the parameters"


def cell_literals(nb) -> dict:
    """Name -> value of the ``parameters`` cell, read with ``ast`` (not papermill), so both readers must agree."""
    cell = nb.cells[parameters_cells(nb)[0]]
    return {stmt.targets[0].id: ast.literal_eval(stmt.value) for stmt in ast.parse(cell.source).body}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_defaults_are_the_committed_profile(name):
    """Opened in JupyterLab and run as they are, the notebooks train Gemma 3 270M on THUCNews headlines."""
    assert COMMITTED_PROFILE == "gemma3-270m"
    gemma = PROFILES["gemma3-270m"]  # the raw profile: swanlab_mode None (local with the dashboard, else offline)
    defaults = cell_literals(read(name))
    assert defaults, name
    for key, value in defaults.items():
        assert key in gemma, f"{name}: parameter {key} is in no profile"
        assert type(value) is type(gemma[key]) and value == gemma[key], \
            f"{name}: default {key}={value!r} differs from the gemma3-270m profile's {gemma[key]!r}"
    assert defaults["profile"] == "gemma3-270m" and defaults["out_dir"] == "../runs/gemma3-270m"


def test_committed_data_paths_are_where_make_setup_puts_thucnews():
    """01's defaults, resolved from notebooks/ (JupyterLab, nbval and `qwen-cls run` all run there), name the
    files `make setup` writes (its target data/thucnews/README.md, `download-data --out data/thucnews`)."""
    defaults = cell_literals(read("01_data_conversion.ipynb"))
    assert (NB_DIR / defaults["train_path"]).resolve() == ROOT / "data" / "thucnews" / "train.jsonl"
    assert (NB_DIR / defaults["test_path"]).resolve() == ROOT / "data" / "thucnews" / "test.jsonl"
    assert defaults["dataset"] == "thucnews" and defaults["download_data"] is True  # missing: 01 fetches it
    assert "--out data/thucnews" in (ROOT / "Makefile").read_text(encoding="utf-8")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_sets_every_notebook_parameter(profile):
    """Injecting a profile fixes every value of every notebook: no committed (gemma3-270m) default leaks into a
    tiny copy; and no profile key is one that no notebook reads."""
    declared = set().union(*(notebook_parameters(NB_DIR / n) for n in ALL_NOTEBOOKS))
    assert set(PROFILES[profile]) == declared, (declared ^ set(PROFILES[profile]))


def test_qwen_profile_uses_the_recipe():
    real = PROFILES["qwen2-0.5b"]
    assert (real["learning_rate"], real["per_device_train_batch_size"], real["gradient_accumulation_steps"]) == (
        1e-4, 4, 4)
    assert (real["lora_r"], real["lora_alpha"], real["lora_dropout"]) == (8, 32, 0.1)
    assert (real["num_train_epochs"], real["max_length"], real["gradient_checkpointing"]) == (2, 384, True)
    assert real["base_model"] == "qwen/Qwen2-0.5B" and real["download_data"] is True


@pytest.mark.parametrize("name", CORE)
def test_opens_with_goal_time_reads_writes(name):
    first = read(name).cells[0]
    assert first.cell_type == "markdown"
    for word in ("目标", "用时", "读取", "写入"):
        assert word in first.source, f"{name}: the opening cell lacks {word}"


@pytest.mark.parametrize("name", NOTEBOOKS[1:])
def test_exercises_at_the_end_with_solutions_apart(name):
    nb = read(name)
    # the exercises cell, then only its answer and check cells (tests/test_exercises.py checks those)
    last = next(c for c in nb.cells if c.cell_type == "markdown" and "## 练习" in c.source)
    assert all(c.cell_type == "code" for c in nb.cells[nb.cells.index(last) + 1:])
    solution = NB_DIR / "solutions" / name.replace(".ipynb", ".md")
    assert solution.is_file() and solution.name in last.source
    n_exercises = sum(1 for line in last.source.splitlines() if line[:2] in {f"{k}." for k in range(1, 10)})
    text = solution.read_text(encoding="utf-8")
    assert n_exercises >= 2 and all(f"## {k}." in text for k in range(1, n_exercises + 1)), solution


def test_04_chooses_the_abstention_threshold_on_validation_rows_and_applies_it_to_test_rows_once():
    """Issue 32: --min-confidence is chosen on the validation rows' accuracy/coverage curve; the test rows'
    confidences meet only the chosen threshold."""
    import ast

    tree = ast.parse("\n".join(c.source for c in read("04_evaluation.ipynb").cells if c.cell_type == "code"
                               and not c.source.lstrip().startswith(("%", "!"))))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    curves = [c for c in calls if c.func.id == "accuracy_coverage"]
    on_validation = [c for c in curves if "validation" in ast.unparse(c.args[0]) + ast.unparse(c.args[1])]
    on_test = [c for c in curves if c not in on_validation]
    assert len(on_validation) == 1 and ast.unparse(on_validation[0].args[2]) == "thresholds"
    assert on_test and all(ast.unparse(c.args[2]) == "[chosen['threshold']]" for c in on_test), \
        [ast.unparse(c) for c in on_test]
    chooser = [c for c in calls if c.func.id == "choose_min_confidence"]
    assert [ast.unparse(c.args[0]) for c in chooser] == ["curve"]
    assigned = {ast.unparse(n.targets[0]): ast.unparse(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)}
    assert assigned["curve"] == ast.unparse(on_validation[0]) and "validation" in assigned["validation_scored"]


@pytest.mark.parametrize("name, needles", [
    ("02_tokenization.ipynb", ["render_prompt(", "def fit_prompt(", "def process_func(", "encode_prompts(",
                               "[:MAX_LENGTH]", "truncation_report(", "length_histogram("]),
    ("03_lora_training.ipynb", ["LoraConfig(", "TrainingArguments(", 'train_sampling_strategy="group_by_length"',
                                "AnswerOnlyTrainer(", "ClassificationEvalCallback(", "swanlab_callbacks(", "use_cpu=",
                                "activation_checkpointing=", "compare_loss_speed(", "loss_curve(",
                                "result = trainer.train()", "batch_shared_prefix(", "share_prefix=True",
                                "run_record.save_training(",
                                "model.save_pretrained(adapter_dir)", "PeftModel.from_pretrained(base, adapter_dir)"]),
    ("04_evaluation.ipynb", ["def score_row(", "score_candidates(", "<|im_end|>", "generate_answers(",
                             "classification_metrics(", "confusion_matrix(", "log_evaluation(", "tracking.finish()",
                             "compare_eval_speed(", "expected_calibration_error(", "reliability_diagram(",
                             '"probabilities": s.probabilities', "accuracy_coverage("]),
    ("05_rag.ipynb", ["rag_predictions.jsonl", "rag_timing.json"]),  # what 06 reads instead of re-scoring
    ("06_approaches.ipynb", ["TfidfVectorizer(", "LogisticRegression(", "restricted_rows(",
                             "AutoModelForSequenceClassification.from_pretrained(", "num_labels=len(labels)",
                             "id2label=dict(enumerate(labels))",
                             "label2id={label: i for i, label in enumerate(labels)}",
                             "task_type=TaskType.SEQ_CLS", "modules_to_save=[SEQ_CLS_HEAD]", "get_peft_model(",
                             "Trainer(", "save_seq_cls(",
                             "load_seq_cls(", '"approaches.json"', "approaches_cost(", "rag_predictions.jsonl"]),
])
def test_lines_a_learner_must_see_stay_in_the_notebook(name, needles):
    source = "\n".join(c.source for c in read(name).cells)
    for needle in needles:
        assert needle in source, f"{name} lacks {needle}"


def _functions(name: str) -> dict:
    """Function definitions of a notebook's code cells: name -> ``ast.FunctionDef``."""
    code = "\n".join(c.source for c in read(name).cells if c.cell_type == "code")
    return {n.name: n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)}


def _called(function) -> set[str]:
    """Names of the functions and methods a function body calls."""
    calls = (n.func for n in ast.walk(function) if isinstance(n, ast.Call))
    return {f.id if isinstance(f, ast.Name) else f.attr for f in calls if isinstance(f, (ast.Name, ast.Attribute))}


@pytest.mark.parametrize("name, rule, must_call, library_versions, user", [
    # 02: the truncation rule written out (render, tokenize with offsets, cut the text); process_func uses it
    ("02_tokenization.ipynb", "fit_prompt", {"render_prompt", "tokenizer", "label_ids"},
     {"encode_prompts", "fit_prompts", "process_batch", "tokenize_dataset"}, "process_func"),
    # 04: the scoring rule written out (one forward pass per candidate, sum of log-probs, argmax)
    ("04_evaluation.ipynb", "score_row", {"model", "log_softmax", "label_ids", "end_id", "max"},
     {"score_candidates"}, None),
])
def test_rule_functions_are_written_out_in_the_notebook(name, rule, must_call, library_versions, user):
    functions = _functions(name)
    assert rule in functions, f"{name} does not define {rule}()"
    called = _called(functions[rule])
    assert must_call <= called, f"{name}: {rule}() does not call {sorted(must_call - called)}"
    assert not called & library_versions, f"{name}: {rule}() delegates to {sorted(called & library_versions)}"
    if user:
        assert rule in _called(functions[user]), f"{name}: {user}() does not use {rule}()"


@pytest.mark.subprocess
@pytest.mark.parametrize("name, maker", [("02_tokenization.ipynb", "01_data_conversion"),
                                         ("03_lora_training.ipynb", "02_tokenization"),
                                         ("04_evaluation.ipynb", "01_data_conversion"),
                                         ("06_approaches.ipynb", "01_data_conversion")])
def test_opened_alone_without_inputs_names_the_notebook_that_makes_them(name, maker, tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(NB_DIR / name), str(tmp_path / name), parameters={"out_dir": str(tmp_path)},
                                   cwd=str(NB_DIR), progress_bar=False)
    assert info.value.ename == "FileNotFoundError" and maker in info.value.evalue


@pytest.mark.subprocess
def test_rag_notebook_opened_alone_names_the_notebooks_that_make_its_inputs(tmp_path):
    """05 needs 01's data files, then 02/03's adapter and run_config.json: each gap names its maker."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    def run_05():
        with pytest.raises(PapermillExecutionError) as info:
            papermill.execute_notebook(str(NB_DIR / "05_rag.ipynb"), str(tmp_path / "05_rag.ipynb"),
                                       parameters={"out_dir": str(tmp_path)}, cwd=str(NB_DIR), progress_bar=False)
        assert info.value.ename == "FileNotFoundError"
        return info.value.evalue

    evalue = run_05()  # empty out_dir
    assert "01_data_conversion" in evalue and "train.jsonl" in evalue
    (tmp_path / "data").mkdir()
    row = '{"text": "球队夺冠。", "category": ["Sports", "Art"], "output": "Sports"}\n'
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "data" / name).write_text(row, encoding="utf-8")
    evalue = run_05()  # data present, no adapter yet
    assert "02_tokenization" in evalue and "03_lora_training" in evalue and "adapter" in evalue


def test_lora_notebook_shows_peft_collator_and_answer_only_loss():
    """03 builds the LoRA model, the collator and the answer-only loss in its own cells (checked against the
    library there), draws the LoRA picture and a token strip, and prints no raw ``TrainOutput``."""
    nb = read("03_lora_training.ipynb")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for needle in ("get_peft_model(", "print_trainable_parameters()", "enable_input_require_grads()",
                   "activation_checkpointing_enable(", "prepare_lora_model(", "DataCollatorForSeq2Seq(",
                   "padding_collator(", "def answer_only_loss", "library.answer_only_loss(", "lora_picture(",
                   "token_strip(", "disable_tqdm=True"):
        assert needle in code, f"03 lacks {needle}"
    assert "TrainOutput" not in code and "print(result)" not in code
    loss = _functions("03_lora_training.ipynb")["answer_only_loss"]
    called = _called(loss)
    assert {"model", "cross_entropy", "zeros_like"} <= called, sorted(called)
    assert not called & {"answer_only_loss", "answer_positions"}, "answer_only_loss() delegates to the library"
    assert "logits_to_keep" in ast.unparse(loss)



def _code_cell_with(name: str, needle: str) -> str:
    cells = [c.source for c in read(name).cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, f"{name}: {len(cells)} code cells hold {needle!r}"
    return cells[0]


def test_03_training_cell_shows_the_trainer_and_train_plainly():
    """The cell that trains is the Trainer's construction, its arguments one per line, and ``trainer.train()``:
    callbacks, printing and the run record live in the library (``show_progress``, ``run_record``)."""
    cell = _code_cell_with("03_lora_training.ipynb", "trainer.train()")
    tree = ast.parse(cell)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))], "plumbing in the cell"
    lines = [line for line in cell.splitlines() if line.strip() and not line.lstrip().startswith(("#", "from "))]
    assert len(lines) <= 16, f"the training cell has {len(lines)} lines"
    build = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "AnswerOnlyTrainer")
    assert [k.arg for k in build.keywords] == ["model", "args", "train_dataset", "data_collator", "share_prefix",
                                               "callbacks"]
    assert {ast.unparse(k.value) for k in build.keywords if k.arg in ("model", "args", "data_collator")} == \
        {"model", "args", "data_collator"}
    called = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"ClassificationEvalCallback(monitor_rows, tokenizer, max_length=max_length).bind", "show_progress",
            "trainer.train"} <= called, sorted(called)
    assert "run_config(" not in cell and "save_training(" not in cell  # the record is section 8's


def test_03_saves_and_reloads_the_adapter_and_compares_scores():
    """Section 8 saves with the library's call and loads the adapter back with PEFT, comparing the reloaded
    model's candidate scores with the trained model's in the run's dtype, with no float32 copy of either model
    (the cell itself: test_notebook_checks.py)."""
    save = _code_cell_with("03_lora_training.ipynb", "save_training(")
    assert "run_record.run_config(" in save and "adapter_dir.iterdir()" in save
    load = _code_cell_with("03_lora_training.ipynb", "PeftModel.from_pretrained(")
    for needle in ("score_candidates(model,", "score_candidates(reloaded,",
                   "trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)", "assert "):
        assert needle in load, f"03's reload cell lacks {needle}"
    assert "float32_weights" not in load  # two float32 copies of a 0.5B model: gigabytes for nothing
    names = [c.source for c in read("03_lora_training.ipynb").cells]
    assert names.index(save) < names.index(load)

def test_tokenization_notebook_draws_a_token_strip():
    code = "\n".join(c.source for c in read("02_tokenization.ipynb").cells if c.cell_type == "code")
    assert "token_strip(" in code and "length_histogram(" in code  # at least two pictures
