"""The synthetic generators' uncertain mode: a random choice no context reveals (a corner patch of one of 4 ids per
token grid; a raw-format square in one of 4 slots per 8-frame block), the rest of the scene unchanged, and the
Bayes-optimal prediction that `wmfast reproduce` scores as the generator's ceiling."""
import numpy as np
import pytest

from wmfast.data import TokenizedDataset, write_synthetic_dataset
from wmfast.data.raw_synthetic import (
    BLOCK,
    SLOTS,
    WANDERER,
    _synthetic_states,
    bayes_frame,
    bayes_prediction,
    draw,
    make_scene,
    render_frames,
    synthetic_params,
    write_raw_split,
)
from wmfast.data.synthetic import BLINK_CHOICES, NOISE, blink_patch, future_token_law, token_marginal


def test_tokenized_corner_patch_is_random_and_the_rest_determined(tmp_path):
    grid, vocab = 8, 512
    write_synthetic_dataset(str(tmp_path / "u"), 1, 1020, seed=3, grid_size=grid, vocab_size=vocab, uncertain=True)
    write_synthetic_dataset(str(tmp_path / "c"), 1, 1020, seed=3, grid_size=grid, vocab_size=vocab)
    bp = blink_patch(grid)
    u = TokenizedDataset(str(tmp_path / "u"), "train", vocab_size=vocab)
    c = TokenizedDataset(str(tmp_path / "c"), "train", vocab_size=vocab)
    patches = np.stack([u[i]["tokens"][:, -bp:, -bp:].numpy() for i in range(len(u))])  # [n, 6, bp, bp]
    ids, counts = np.unique(patches, return_counts=True)
    top = ids[np.argsort(counts)[-BLINK_CHOICES:]]
    assert counts[np.isin(ids, top)].sum() / patches.size > 1 - 3 * NOISE  # 4 ids, apart from tokenizer noise
    shares = np.array([np.mean(patches == i) for i in top])
    assert np.all(np.abs(shares - 1 / BLINK_CHOICES) < 0.08), shares  # about uniform
    same_grid = patches[:, :, 0, 0]
    assert np.mean(same_grid[:, 4] == same_grid[:, 5]) < 0.5  # drawn afresh every grid
    # texture ids follow the skewed marginal (shared by the splits), the plain mode's are uniform
    def share_of_common(ds):
        tokens = np.stack([ds[i]["tokens"].numpy() for i in range(len(ds))])
        mask = np.ones(tokens.shape[-2:], bool)
        mask[-bp:, -bp:] = False
        common = np.argsort(token_marginal(vocab))[-vocab // 8:]  # the 1/8 most likely ids
        return np.isin(tokens[..., mask], common).mean(), token_marginal(vocab)[common].sum()

    got, expected = share_of_common(u)
    assert abs(got - expected) < 0.1 and expected > 0.3
    assert share_of_common(c)[0] < 0.2  # about 1/8 when uniform


@pytest.mark.parametrize("uncertain", [False, True])
def test_future_token_law_is_a_distribution(uncertain):
    for grid, vocab in ((8, 512), (32, 64000)):
        law = future_token_law(grid, vocab, uncertain)
        assert sum(share for share, *_ in law) == pytest.approx(1.0)
        for _, named, p_named, p_rest in law:
            assert named * p_named + (vocab - named) * p_rest == pytest.approx(1.0)
    assert len(future_token_law(8, 512, uncertain)) == (2 if uncertain else 1)


def test_raw_scene_slots_and_the_rest_unchanged():
    rng = np.random.default_rng(0)
    states, seg = _synthetic_states(rng, 300, 0)
    scene = make_scene(states, seg, 64, seed=5, uncertain=True)
    assert set(np.unique(scene.slot)) <= set(range(SLOTS)) and len(np.unique(scene.slot)) > 1
    blocks = scene.slot[: len(scene.slot) // BLOCK * BLOCK].reshape(-1, BLOCK)
    assert np.all(blocks == blocks[:, :1])  # one slot a block
    plain, wandering = render_frames(states, seg, 64, 5), render_frames(states, seg, 64, 5, uncertain=True)
    blue = np.all(wandering == np.array(WANDERER, np.uint8), axis=-1)
    assert blue.any(axis=(1, 2)).mean() > 0.8  # visible in most frames (other shapes may cover parts of it)
    np.testing.assert_array_equal(plain[~blue], wandering[~blue])  # nothing else changes


def test_bayes_frame_is_the_mean_over_slots():
    rng = np.random.default_rng(1)
    states, seg = _synthetic_states(rng, 100, 0)
    scene = make_scene(states, seg, 64, seed=2, uncertain=True)
    mean = bayes_frame(scene, 40)
    renders = np.stack([draw(scene, 40, s).astype(np.float64) for s in range(SLOTS)])
    np.testing.assert_allclose(mean, renders.mean(0))
    assert any(np.array_equal(draw(scene, 40), r.astype(np.uint8)) for r in renders)
    # the mean's squared error is below the average single render's (variance decomposition)
    truth = draw(scene, 40).astype(np.float64)
    assert np.mean((mean - truth) ** 2) < np.mean((renders - truth) ** 2)
    certain = make_scene(states, seg, 64, seed=2)
    np.testing.assert_array_equal(bayes_frame(certain, 40), draw(certain, 40).astype(np.float64))


@pytest.mark.requires("av")
def test_bayes_prediction_of_a_written_split(tmp_path):
    d = write_raw_split(str(tmp_path / "val"), 1, 154, seed=4, size=64, uncertain=True)
    assert synthetic_params(d) == {"seed": 4, "size": 64, "uncertain": True}
    states = np.fromfile(f"{d}/states_0.bin", np.float32).reshape(-1, 25)
    seg = np.fromfile(f"{d}/segment_idx_0.bin", np.int32)
    scene = make_scene(states, seg, 64, 4, True)
    np.testing.assert_array_equal(bayes_prediction(d, 0, 100), bayes_frame(scene, 100))
    with pytest.raises(ValueError, match="not a synthetic raw split"):
        bayes_prediction(str(tmp_path), 0, 0)
