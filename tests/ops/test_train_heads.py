"""`baton train-heads`: the model's own answers, with the hidden state behind each token, train
heads that then agree with the model more often than untrained ones; the command saves heads a
worker can load."""

from __future__ import annotations

import json
import time

import pytest
import torch
import typer
from typer.testing import CliRunner

from baton.actors.medusa import MedusaHeads
from baton.actors.model_runner import load_model
from baton.actors.model_source import resolve
from baton.actors.tiny import tiny_model, tiny_tokenizer
from baton.ops.heads_corpus import TOP_K, Answer, Corpus, encode, generate_answers
from baton.ops.heads_prompts import build_prompts
from baton.ops.heads_training import agreement, draft_vocab, fit, untrained_agreement
from baton.ops.train_heads import train_heads_command

MAX_NEW = 40


@pytest.fixture(scope="module")
def model_and_corpus():
    source = resolve("tiny:llama")
    model, tokenizer = load_model(source, torch.float32, torch.device("cpu"))
    model.set_attn_implementation("sdpa")
    prompts = [encode(tokenizer, source.name, 257, p) for p in build_prompts()[::20]]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=8,
                               deadline=time.monotonic() + 600)
    return model, Corpus.join(answers, 64), answers


def test_prompt_set_is_diverse():
    prompts = build_prompts()
    families = {p.family for p in prompts}
    assert len(prompts) >= 100 and len({p.text for p in prompts}) == len(prompts)
    assert {"chat", "story", "code", "summarize", "extract", "raw"} <= families


def test_each_hidden_state_is_the_one_that_produced_its_token(model_and_corpus):
    model, corpus, answers = model_and_corpus
    assert len(answers) == 8
    with torch.inference_mode():
        top = model.lm_head(corpus.hidden).topk(TOP_K, dim=-1).indices
    assert torch.equal(top, corpus.top)
    for answer in answers:  # greedy: what was emitted is the model's first choice
        assert torch.equal(answer.tokens, answer.top[:, 0])
        # an answer ends at its end-of-sequence token or at the limit
        assert len(answer) == MAX_NEW or answer.tokens[-1].item() == 256
        assert 256 not in answer.tokens[:-1].tolist()


def test_sampled_answers_keep_the_models_own_choices(model_and_corpus):
    model, _, _ = model_and_corpus
    torch.manual_seed(0)
    answers = generate_answers(model, tiny_tokenizer(), [list(b"Once upon a time")],
                               max_new_tokens=30, batch_size=1, deadline=time.monotonic() + 600,
                               temperature=1.5)
    (answer,) = answers
    assert not torch.equal(answer.tokens, answer.top[:, 0])  # sampled, not greedy
    with torch.inference_mode():
        assert torch.equal(model.lm_head(answer.hidden).argmax(-1), answer.top[:, 0])


def test_targets_are_the_models_own_tokens_ahead_within_each_answer():
    def answer(greedy: list[int]) -> Answer:
        top = torch.tensor(greedy).unsqueeze(1) + 100 * torch.arange(TOP_K)  # runners-up
        return Answer(torch.zeros(len(greedy), 2), torch.tensor(greedy), top)

    corpus = Corpus.join([answer([10, 11, 12, 13]), answer([20, 21, 22])], 2)
    assert corpus.targets(2).tolist() == [
        # hidden[0] produced 10; head 0 drafts the token after it, head 1 the one after that
        [11, 12], [12, 13], [13, -1], [-1, -1],
        [21, 22], [22, -1], [-1, -1],  # never across into another answer
    ]


def test_conditioned_heads_see_the_answers_token_before_their_target():
    corpus = Corpus.join([Answer(torch.zeros(3, 2), torch.tensor([10, 11, 12]),
                                 torch.tensor([[10], [11], [12]]).expand(3, TOP_K))], 2)
    # hidden[0] produced 10: head 0 drafts the token after 10 (seeing 10), head 1 the next
    # (seeing 11); where a head has no target it sees nothing.
    assert corpus.prev_tokens(2).tolist() == [[10, 11], [11, 12], [12, -1]]


def test_serving_drafts_among_the_models_own_first_choices():
    top = torch.tensor([[12, 3], [11, 4], [12, 5], [10, 3]])  # first choices, then runners-up
    corpus = Corpus.join([Answer(torch.zeros(4, 2), top[:, 0], top)], 2)
    assert draft_vocab(corpus, torch.tensor([3, 4, 5, 10, 11, 12])).tolist() == [10, 11, 12]
    assert draft_vocab(corpus, None) is None  # trained over every token: drafts among all


@pytest.mark.parametrize("conditioned", [False, True])
def test_training_raises_agreement_with_the_model_on_its_own_text(model_and_corpus, conditioned):
    model, corpus, _ = model_and_corpus
    heads = MedusaHeads.for_model(model, 3, conditioned=conditioned)
    positions = torch.nonzero(corpus.targets(3)[:, -1] >= 0).squeeze(1)
    before = agreement(heads, corpus, positions)
    assert before == pytest.approx(untrained_agreement(corpus, 3, positions))
    fit(heads, corpus, time.monotonic() + 600, seed=0, max_steps=60, batch_positions=256,
        lr=3e-2, on_step=lambda *a: None)
    after = agreement(heads, corpus, positions)
    for head in range(3):
        assert after[head] > before[head] + 0.3, (before, after)


def test_command_saves_heads_a_worker_loads(tmp_path):
    app = typer.Typer()
    app.command()(train_heads_command)
    out = tmp_path / "heads"
    result = CliRunner().invoke(app, ["--model", "tiny:llama", "--out", str(out), "--minutes",
                                      "0.5", "--heads", "2", "--output", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["agreement"]) == len(report["untrained"]) == 2
    assert report["positions"]["evaluated"] > 0 and report["steps"] > 0
    heads = MedusaHeads.load(out, tiny_model("llama"))
    assert heads.num_heads == 2
    saved = json.loads((out / "medusa_config.json").read_text())
    assert saved["training"]["agreement"] == report["agreement"]
