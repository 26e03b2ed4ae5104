"""The needle recall harness: haystacks of exact length with the needle at the asked depth (deterministic
by seed), exact-match scoring, recall 1.0 for answers that read the needle out of the prompt and 0.0 for
answers that do not, the CLI's refusals (exit 2, the input named, nothing loaded), and one run of the
CLI through the serving engine on a tiny checkpoint."""

import json
import re

import jax
import pytest

from nemojax.checkpoint.orbax import save_model
from nemojax.config import from_hf_config
from nemojax.eval import haystack
from nemojax.eval.cli import ANSWER_TOKENS, main, parse_lengths
from nemojax.eval.haystack import build_case, filler_ids, make_cases, needle_text, question_text
from nemojax.eval.needle import format_table, run_needle, summarize
from nemojax.eval.scoring import answer_number, is_correct
from nemojax.generate import Engine
from nemojax.model import init_variables
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

CONTEXT = 320
TINY = dict(vocab_size=300, hidden_size=32, hybrid_override_pattern="M*", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=8, max_position_embeddings=CONTEXT, eos_token_id=2, compute_dtype="float32",
            param_dtype="float32")
PREFIX = (1,)


def encode(text: str) -> list[int]:
    """A character-level stand-in tokenizer (ids 16.. so no special id appears)."""
    return [16 + ord(c) % 240 for c in text]


def decode(ids) -> str:
    return "".join(chr(i - 16) for i in ids)


def test_haystack_has_the_exact_length_and_the_needle_at_the_asked_depth():
    depths = [0.0, 0.3, 1.0]
    cases = make_cases(encode, PREFIX, [200, 300], depths, samples=2, seed=5)
    assert [(c.length, c.depth, c.sample) for c in cases] == [(n, d, s) for n in (200, 300) for d in depths
                                                                for s in range(2)]
    for case in cases:
        ids = case.prompt_ids
        needle, question = encode(needle_text(case.key, case.value)), encode(question_text(case.key))
        assert len(ids) == case.length
        assert ids[:1] == PREFIX and list(ids[-len(question):]) == question
        assert list(ids[case.needle_at:case.needle_at + case.needle_tokens]) == needle
        room = case.length - len(PREFIX) - len(needle) - len(question)
        assert case.needle_at - len(PREFIX) == round(case.depth * room)
        filler = list(ids[1:case.needle_at]) + list(ids[case.needle_at + len(needle):-len(question)])
        assert filler == filler_ids(encode, room, seed=5)[:room]  # the same corpus text, needle taken out
        assert len(case.value) == haystack.VALUE_DIGITS and re.fullmatch(r"[a-z]+-[a-z]+", case.key)
    assert cases[0].needle_at == 1 and cases[-1].needle_at + cases[-1].needle_tokens == 300 - len(question)


def test_haystack_is_deterministic_by_seed_and_independent_of_the_other_lengths():
    one = make_cases(encode, PREFIX, [300], [0.5], samples=2, seed=1)
    assert one == make_cases(encode, PREFIX, [300], [0.5], samples=2, seed=1)
    assert one == make_cases(encode, PREFIX, [200, 300], [0.5], samples=2, seed=1)[2:]
    other = make_cases(encode, PREFIX, [300], [0.5], samples=2, seed=2)
    assert [c.prompt_ids for c in other] != [c.prompt_ids for c in one]
    assert one[0].value != one[1].value or one[0].key != one[1].key


def test_haystack_refuses_a_length_the_needle_does_not_fit_in():
    with pytest.raises(ValueError, match="too short"):
        build_case(encode, PREFIX, encode("x" * 100), 40, 0.5, 0, "calm-river", "1234567")


def test_exact_match_scoring():
    assert is_correct("1234567", "1234567") and is_correct(" 1234567.\nThe", "1234567")
    assert is_correct("it is 1234567, surely", "1234567")
    for wrong in ("12345678", "123456", "no number", "", "7 and then 1234567", "1234 567"):
        assert not is_correct(wrong, "1234567"), wrong
    assert answer_number("x 42 y 7") == "42" and answer_number("none") is None


def test_answers_read_from_the_prompt_score_full_recall_and_wrong_ones_zero():
    """An 'oracle' that finds the needle's sentence in the decoded prompt recalls everything; answers that
    miss it (another number, the number off by one, nothing) recall nothing, at every length and depth."""
    cases = make_cases(encode, PREFIX, [200, 400], [0.0, 0.5, 1.0], samples=2, seed=0)

    def oracle(batch):
        found = []
        for c in batch:
            text = decode(c.prompt_ids[1:])
            match = re.search(rf"special magic number for {c.key} is (\d+)\.", text)
            found.append(" " + match.group(1) + ".")
        return found

    full = summarize(run_needle(cases, oracle))
    assert full["recall"] == {"200": 1.0, "400": 1.0} and full["overall_recall"] == 1.0
    assert all(r == 1.0 for by in full["recall_by_depth"].values() for r in by.values())
    for wrong in (lambda b: [str(int(c.value) + 1) for c in b], lambda b: ["1234" for _ in b],
                  lambda b: ["" for _ in b]):
        none = summarize(run_needle(cases, wrong))
        assert none["recall"] == {"200": 0.0, "400": 0.0} and not any(c["correct"] for c in none["cases"])
    half = summarize(run_needle(cases, lambda b: [c.value if c.depth == 0.0 else "0" for c in b]))
    assert half["recall_by_depth"]["200"] == {"0.0": 1.0, "0.5": 0.0, "1.0": 0.0}
    assert half["recall"]["400"] == pytest.approx(1 / 3)
    table = format_table(half).splitlines()
    assert table[0].split() == ["length", "depth", "0.00", "depth", "0.50", "depth", "1.00", "recall"]
    assert table[1].split() == ["200", "1.00", "0.00", "0.00", "0.33"]


def test_lengths_parse_with_suffixes():
    assert parse_lengths("4k, 1k,300,1k") == [300, 1024, 4096]
    assert parse_lengths("1m") == [1 << 20]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(a tiny model with a byte-level tokenizer, the same model without one)."""
    config = from_hf_config(TINY)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    with_tokenizer, bare = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("bare")
    save_model(with_tokenizer, config, variables)
    save_model(bare, config, variables)
    texts = ["def special(magic, number):\n    return magic + 1234567\n", "the quick brown fox"] * 20
    save_tokenizer(train_tokenizer(texts, 300), str(with_tokenizer))
    return str(with_tokenizer), str(bare)


@pytest.fixture
def never_generate(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was used before the input was checked")
    monkeypatch.setattr(Engine, "generate", refuse)


@pytest.mark.parametrize("flags, named", [
    (["--lengths", "4q"], "'4q' is not a length"),
    (["--lengths", "0"], "at least 1 token"),
    (["--lengths", "128,"], "'' is not a length"),
    (["--lengths", "1k"], "exceed the model's context of 320"),
    (["--lengths", "128", "--depths", "0,1.5"], "--depths: '1.5' is outside [0, 1]"),
    (["--lengths", "128", "--depths", "half"], "--depths: 'half'"),
    (["--lengths", "40"], "--lengths: length 40 is too short"),
    (["--lengths", "128", "--checkpoint", "{missing}"], "no such checkpoint directory"),
    (["--lengths", "128", "--checkpoint", "{bare}"], "has no tokenizer.json"),
    (["--lengths", "128", "--output", "{missing}/out.json"], "does not exist"),
    (["--lengths", "128", "--dtype", "int3"], "--dtype int3"),
])
def test_bad_input_is_refused_before_the_model_runs(checkpoints, tmp_path, capsys, never_generate, flags, named):
    paths = {"missing": str(tmp_path / "missing"), "bare": checkpoints[1]}
    argv = ["needle", "--checkpoint", checkpoints[0], *(f.format(**paths) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named.format(**paths) in err and "Traceback" not in err


def test_needle_cli_runs_through_the_engine(checkpoints, tmp_path, capsys):
    """A random tiny model: recall is whatever it is (about 0), but every case is served, scored from
    its own answer, and reported consistently in the table and the JSON."""
    output = tmp_path / "recall.json"
    lengths = [200, CONTEXT - ANSWER_TOKENS]
    assert main(["needle", "--checkpoint", checkpoints[0], "--lengths", ",".join(map(str, lengths)),
                 "--depths", "0,1", "--batch-size", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out.splitlines()
    record = json.loads(output.read_text())
    assert record["lengths"] == lengths and record["depths"] == [0.0, 1.0]
    assert [(c["length"], c["depth"]) for c in record["cases"]] == [(n, d) for n in lengths for d in (0.0, 1.0)]
    for case in record["cases"]:
        assert case["prompt_tokens"] == case["length"]
        assert case["correct"] == (answer_number(case["answer"]) == case["value"])
    for n in lengths:
        correct = [c["correct"] for c in record["cases"] if c["length"] == n]
        assert record["recall"][str(n)] == sum(correct) / 2
        assert any(line.split()[0] == str(n) and line.split()[-1] == f"{sum(correct) / 2:.2f}" for line in printed)
