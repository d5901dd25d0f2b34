"""BLIP's objectives (losses/blip.py) against independent float64 computations written out with loops,
the distributed ITC against one process holding the whole batch, and the hard-negative sampler against
its promise never to draw a positive."""
import math

import pytest
import torch
import torch.nn.functional as F

from crossmodal.kernels.reference import contrastive_loss_local
from crossmodal.losses import (
    FeatureQueue,
    all_gather_no_grad,
    alpha_ramp,
    copy_params,
    diagonal_positives,
    distillation_targets,
    itc_loss,
    itm_loss,
    lm_labels,
    lm_loss,
    momentum_update,
    positives_from_ids,
    sample_hard_negatives,
    sequence_lm_loss,
)
from tests.multiprocess import run_on_processes

N, D, K = 8, 5, 6  # global batch, feature width, queue size
IDS = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])  # several captions per image
QUEUE_IDS = torch.tensor([1, 5, 3, -100, 6, 0])


def unit(*shape, generator, dim=-1):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=dim)


def make_itc_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text, image_m, text_m = (unit(N, D, generator=g) for _ in range(4))
    image_queue, text_queue = unit(D, K, generator=g, dim=0), unit(D, K, generator=g, dim=0)
    return image, text, image_m, text_m, image_queue, text_queue, torch.tensor(0.07, dtype=torch.float64)


def naive_itc(image, text, image_m, text_m, image_queue, text_queue, temp, alpha, offset, ids=None):
    """ALBEF/BLIP ITC written row by row: columns are [momentum batch; queue], targets mix softmax and hard."""
    columns_text = [text_m[j] for j in range(len(text_m))] + [text_queue[:, k] for k in range(text_queue.shape[1])]
    columns_image = [image_m[j] for j in range(len(image_m))] + [image_queue[:, k] for k in range(image_queue.shape[1])]
    column_ids = None
    if ids is not None:
        column_ids = [int(i) for i in ids] + [int(i) for i in QUEUE_IDS[: text_queue.shape[1]]]
    total = {"i2t": 0.0, "t2i": 0.0}
    rows = len(image)
    for i in range(rows):
        me = offset + i
        if column_ids is None:
            hard = [1.0 if c == me else 0.0 for c in range(len(columns_text))]
        else:
            matches = [1.0 if column_ids[c] == column_ids[me] else 0.0 for c in range(len(columns_text))]
            hard = [m / sum(matches) for m in matches]
        for name, row, row_m, columns in (
            ("i2t", image[i], image_m[me], columns_text),
            ("t2i", text[i], text_m[me], columns_image),
        ):
            logits = torch.stack([row @ c / temp for c in columns])
            logits_m = torch.stack([row_m @ c / temp for c in columns]).detach()
            soft = torch.exp(logits_m) / torch.exp(logits_m).sum()
            log_p = logits - torch.log(torch.exp(logits).sum())
            for c in range(len(columns)):
                target = alpha * soft[c] + (1 - alpha) * hard[c]
                total[name] = total[name] - target * log_p[c]
    return (total["i2t"] / rows + total["t2i"] / rows) / 2


def itc_with_grads(image, text, image_m, text_m, image_queue, text_queue, temp, alpha, offset, positives=None):
    image, text, temp = (t.clone().requires_grad_() for t in (image, text, temp))
    loss = itc_loss(image, text, image_m, text_m, image_queue, text_queue, temp, alpha, offset=offset, positives=positives)
    loss.backward()
    return loss.detach(), image.grad, text.grad, temp.grad


@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("rows", [slice(0, N), slice(3, 7)])  # the whole batch, or rows from its middle
def test_itc_matches_naive(use_ids, rows):
    image, text, image_m, text_m, image_queue, text_queue, temp = make_itc_inputs()
    offset, alpha = rows.start, 0.4
    positives = positives_from_ids(IDS[rows], torch.cat([IDS, QUEUE_IDS])) if use_ids else None
    got = itc_with_grads(image[rows], text[rows], image_m, text_m, image_queue, text_queue, temp, alpha, offset, positives)

    image_, text_, temp_ = image[rows].clone(), text[rows].clone(), temp.clone()
    for t in (image_, text_, temp_):
        t.requires_grad_()
    expected = naive_itc(image_, text_, image_m, text_m, image_queue, text_queue, temp_, alpha, offset,
                         IDS if use_ids else None)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach())
    torch.testing.assert_close(got[1], image_.grad)
    torch.testing.assert_close(got[2], text_.grad)
    torch.testing.assert_close(got[3], temp_.grad)


def test_distillation_targets_match_loops():
    g = torch.Generator().manual_seed(1)
    sim_m = torch.randn(4, 7, generator=g, dtype=torch.float64) * 5
    positives = torch.zeros(4, 7, dtype=torch.bool)
    positives[0, 0] = positives[1, [1, 2, 5]] = positives[2, [1, 2]] = positives[3, 6] = True
    got = distillation_targets(sim_m, positives, alpha=0.3)
    for i in range(4):
        count = int(positives[i].sum())
        denominator = sum(math.exp(v) for v in sim_m[i].tolist())
        for c in range(7):
            want = 0.3 * math.exp(sim_m[i, c].item()) / denominator + 0.7 * (1.0 / count if positives[i, c] else 0.0)
            assert got[i, c].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert got[i].sum().item() == pytest.approx(1.0)


def test_itc_without_distillation_or_queue_is_infonce():
    image, text, *_ = make_itc_inputs()
    temp = torch.tensor(0.05, dtype=torch.float64)
    empty = torch.empty(D, 0, dtype=torch.float64)
    got = itc_with_grads(image, text, image, text, empty, empty, temp, 0.0, 0)
    # CLIP's InfoNCE with scale 1/temp; the columns are momentum features, so they carry no gradient
    image_, text_, temp_ = image.clone().requires_grad_(), text.clone().requires_grad_(), temp.clone().requires_grad_()
    expected = contrastive_loss_local(image_, text_, image.detach(), text.detach(), 1 / temp_, 0)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach())
    torch.testing.assert_close(got[1], image_.grad)
    torch.testing.assert_close(got[2], text_.grad)
    torch.testing.assert_close(got[3], temp_.grad)


def test_itc_rejects_rows_outside_the_momentum_batch():
    image, text, image_m, text_m, image_queue, text_queue, temp = make_itc_inputs()
    with pytest.raises(ValueError, match="offset = rank"):
        itc_loss(image[:4], text[:4], image_m[:4], text_m[:4], image_queue, text_queue, temp, 0.4, offset=4)


def test_alpha_ramp():
    assert alpha_ramp(0.4, 0, 100) == 0.0
    assert alpha_ramp(0.4, 50, 100) == pytest.approx(0.2)
    assert alpha_ramp(0.4, 100, 100) == pytest.approx(0.4)
    assert alpha_ramp(0.4, 1000, 100) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------ distributed


def _distributed_itc(rank, world_size):
    image, text, image_m, text_m, image_queue, text_queue, temp = make_itc_inputs()
    batch = N // world_size
    local = slice(rank * batch, (rank + 1) * batch)
    # each rank computes its own momentum features and gathers them, as a model would
    image_m_all, text_m_all = all_gather_no_grad(image_m[local]), all_gather_no_grad(text_m[local])
    ids_all = all_gather_no_grad(IDS[local])
    results = {}
    for use_ids in (False, True):
        positives = positives_from_ids(IDS[local], torch.cat([ids_all, QUEUE_IDS])) if use_ids else None
        results[use_ids] = itc_with_grads(image[local], text[local], image_m_all, text_m_all, image_queue,
                                          text_queue, temp, 0.4, rank * batch, positives)
    return results


def test_itc_distributed_matches_one_process():
    image, text, image_m, text_m, image_queue, text_queue, temp = make_itc_inputs()
    world_size = 2
    per_rank = run_on_processes(_distributed_itc, world_size)
    for use_ids in (False, True):
        positives = positives_from_ids(IDS, torch.cat([IDS, QUEUE_IDS])) if use_ids else None
        loss, grad_image, grad_text, grad_temp = itc_with_grads(
            image, text, image_m, text_m, image_queue, text_queue, temp, 0.4, 0, positives)
        ranks = [r[use_ids] for r in per_rank]
        # DDP averages parameter gradients over ranks
        torch.testing.assert_close(sum(r[0] for r in ranks) / world_size, loss)
        torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / world_size, grad_image)
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / world_size, grad_text)
        torch.testing.assert_close(sum(r[3] for r in ranks) / world_size, grad_temp)


def _distributed_queue_and_negatives(rank, world_size):
    batch = 2
    queue = FeatureQueue(dim=3, size=8)
    enqueued = []
    for step in range(5):
        image = torch.full((batch, 3), 10.0 * step + rank) + torch.arange(batch).view(-1, 1)
        text = -image
        queue.enqueue(image, text, idx=torch.arange(batch) + 100 * step + 10 * rank)
        enqueued.append(image)
    # negatives drawn from every rank's batch: ids repeat across ranks, which must still never be drawn
    ids = torch.tensor([[7, 8, 8], [8, 9, 7]])[rank]  # image ids of this rank's captions
    all_ids = all_gather_no_grad(ids)
    g = torch.Generator().manual_seed(rank)
    positives = positives_from_ids(ids, all_ids)
    drawn = [sample_hard_negatives(torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g), positives, g)
             for _ in range(200)]
    return queue.image_queue.clone(), queue.text_queue.clone(), queue.idx_queue.clone(), int(queue.ptr), positives, drawn


def test_queue_and_negatives_on_two_processes():
    per_rank = run_on_processes(_distributed_queue_and_negatives, 2)
    # global batch 4 into 8 slots, 5 steps: step 4 overwrote slots 0-3, step 3 holds slots 4-7
    expected = torch.zeros(8, 3)
    for step, slots in ((4, range(0, 4)), (3, range(4, 8))):
        for s, (rank, row) in zip(slots, [(0, 0), (0, 1), (1, 0), (1, 1)]):
            expected[s] = 10.0 * step + rank + row
    expected_ids = torch.tensor([400, 401, 410, 411, 300, 301, 310, 311])
    assert [int(r[4].sum()) for r in per_rank] == [8, 6]  # same-id captions on the other rank count too
    for image_queue, text_queue, idx_queue, ptr, positives, drawn in per_rank:
        torch.testing.assert_close(image_queue, expected.T)
        torch.testing.assert_close(text_queue, -expected.T)
        assert idx_queue.tolist() == [expected_ids.tolist()]
        assert ptr == 4
        for neg_text, neg_image in drawn:
            assert not positives[torch.arange(3), neg_text].any()
            assert not positives[torch.arange(3), neg_image].any()


# -------------------------------------------------------------------------------------------- queue


def test_queue_wraps_and_holds_the_last_features():
    queue = FeatureQueue(dim=4, size=12)
    torch.testing.assert_close(queue.image_queue.norm(dim=0), torch.ones(12))  # random unit vectors, as BLIP
    assert (queue.idx_queue == -100).all()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), torch.arange(4) + 10 * step)
               for step in range(5)]
    for image, text, idx in batches:
        queue.enqueue(image, text, idx)
    # 5 batches of 4 into 12 slots: batches 3, 4 (wrapped to the front) and 2 remain
    order = [batches[3], batches[4], batches[2]]
    torch.testing.assert_close(queue.image_queue, torch.cat([b[0] for b in order]).T)
    torch.testing.assert_close(queue.text_queue, torch.cat([b[1] for b in order]).T)
    assert queue.idx_queue[0].tolist() == torch.cat([b[2] for b in order]).tolist()
    assert int(queue.ptr) == 8


def test_queue_rejects_a_batch_that_does_not_divide_it():
    queue = FeatureQueue(dim=4, size=10)
    with pytest.raises(ValueError, match="queue size 10 must be a multiple of the global batch 4"):
        queue.enqueue(torch.randn(4, 4), torch.randn(4, 4))


def test_empty_queue_enqueue_is_a_no_op():
    queue = FeatureQueue(dim=4, size=0)
    queue.enqueue(torch.randn(4, 4), torch.randn(4, 4))
    assert queue.image_queue.shape == (4, 0) and int(queue.ptr) == 0


def test_enqueue_after_the_loss_keeps_its_gradient():
    image, text, image_m, text_m, *_ = make_itc_inputs()
    queue = FeatureQueue(dim=D, size=2 * N).double()
    image.requires_grad_()
    loss = itc_loss(image, text, image_m, text_m, queue.image_queue, queue.text_queue, 0.07, 0.4, offset=0)
    expected = torch.autograd.grad(loss, image, retain_graph=True)[0]
    queue.enqueue(image_m, text_m)  # rewrites the buffers in place before backward, as BLIP's step order
    torch.testing.assert_close(torch.autograd.grad(loss, image)[0], expected)


# -------------------------------------------------------------------------------------------- EMA


def test_momentum_update_is_the_ema_formula():
    g = torch.Generator().manual_seed(0)
    online = [torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]
    momentum = [torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]
    before = [p.detach().clone() for p in momentum]
    momentum_update(online, momentum, momentum=0.9)
    for p, p_m, old in zip(online, momentum, before):
        torch.testing.assert_close(p_m.detach(), 0.9 * old + 0.1 * p.detach())
    copy_params(online, momentum)
    for p, p_m in zip(online, momentum):
        assert torch.equal(p_m, p) and not p_m.requires_grad
    with pytest.raises(ValueError, match="2 online parameters but 1 momentum"):
        momentum_update(online, momentum[:1])


# -------------------------------------------------------------------------------------------- ITM


def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        ids = torch.randint(0, 4, (8,), generator=g)  # several captions per image
        positives = positives_from_ids(ids, ids)
        if positives.all(dim=1).any():
            continue
        scale = [1.0, 20.0, 1000.0][trial % 3]  # 1000: the negatives' softmax underflows to 0
        sim_i2t, sim_t2i = (torch.randn(8, 8, generator=g) * scale for _ in range(2))
        sim_i2t[positives] += 3 * scale  # positives the most similar, as after training
        neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, positives, generator=g)
        rows = torch.arange(8)
        assert not positives[rows, neg_text].any() and not positives[rows, neg_image].any()
    # in-batch pretraining: only the diagonal is excluded
    neg_text, neg_image = sample_hard_negatives(torch.randn(6, 6), torch.randn(6, 6), diagonal_positives(6, 6))
    assert (neg_text != torch.arange(6)).all() and (neg_image != torch.arange(6)).all()


def test_hard_negatives_with_one_negative_left_always_pick_it():
    positives = torch.ones(5, 5, dtype=torch.bool)
    positives[:, 3] = False
    positives[3, 3], positives[3, 0] = True, False
    for _ in range(50):
        neg_text, neg_image = sample_hard_negatives(torch.randn(5, 5) * 50, torch.randn(5, 5) * 50, positives)
        assert neg_text.tolist() == neg_image.tolist() == [3, 3, 3, 0, 3]
    positives[2, 3] = True
    with pytest.raises(ValueError, match="row 2 has no negative candidate"):
        sample_hard_negatives(torch.randn(5, 5), torch.randn(5, 5), positives)


def test_hard_negative_frequencies_follow_softmax_plus_eps():
    sim = torch.tensor([[4.0, 2.0, 1.0, 0.0, -30.0]]).expand(20000, 5)
    positives = torch.zeros(20000, 5, dtype=torch.bool)
    positives[:, 0] = True
    neg_text, _ = sample_hard_negatives(sim, sim, positives, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(neg_text, minlength=5).double() / 20000
    weights = [0.0] + [math.exp(v) / sum(math.exp(u) for u in sim[0].tolist()) + 1e-4 for v in sim[0, 1:].tolist()]
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_uniform_share_mixes_a_flat_draw_over_the_negatives():
    sim = torch.tensor([[4.0, 2.0, 1.0, 0.0, -30.0]]).expand(20000, 5)
    positives = torch.zeros(20000, 5, dtype=torch.bool)
    positives[:, 0] = True
    hard = [0.0] + [math.exp(v) / sum(math.exp(u) for u in sim[0].tolist()) + 1e-4 for v in sim[0, 1:].tolist()]
    hard = torch.tensor(hard, dtype=torch.float64) / sum(hard)
    flat = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    for uniform in (1.0, 0.5):
        neg_text, neg_image = sample_hard_negatives(sim, sim, positives, torch.Generator().manual_seed(1), uniform)
        for drawn in (neg_text, neg_image):
            frequencies = torch.bincount(drawn, minlength=5).double() / 20000
            torch.testing.assert_close(frequencies, (1 - uniform) * hard + uniform * flat, atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="uniform must lie in"):
        sample_hard_negatives(sim[:2], sim[:2], positives[:2], uniform=1.5)


def test_itm_loss_is_cross_entropy_positives_then_negatives():
    g = torch.Generator().manual_seed(0)
    logits_pos, logits_neg = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    terms = [-(row[1] - torch.logsumexp(row, 0)) for row in logits_pos]
    terms += [-(row[0] - torch.logsumexp(row, 0)) for row in logits_neg]
    torch.testing.assert_close(itm_loss(logits_pos, logits_neg), sum(terms) / 9)


# --------------------------------------------------------------------------------------------- LM


def test_lm_labels_mask_pads_and_prompt():
    tokens = torch.tensor([[30522, 1037, 3861, 1997, 2158, 102, 0, 0], [30522, 1037, 3861, 1997, 2058, 2158, 2006, 102]])
    labels = lm_labels(tokens, pad_token_id=0, prompt_length=4)
    assert labels.tolist() == [[-100, -100, -100, -100, 2158, 102, -100, -100],
                               [-100, -100, -100, -100, 2058, 2158, 2006, 102]]
    assert lm_labels(tokens, pad_token_id=0)[0].tolist() == [30522, 1037, 3861, 1997, 2158, 102, -100, -100]
    # one prompt length per row: each row as if masked alone
    per_row = lm_labels(tokens, pad_token_id=0, prompt_length=torch.tensor([2, 5]))
    assert per_row[0].tolist() == lm_labels(tokens[:1], 0, 2)[0].tolist()
    assert per_row[1].tolist() == lm_labels(tokens[1:], 0, 5)[0].tolist()


def test_lm_losses_match_hand_written_label_smoothing():
    g = torch.Generator().manual_seed(0)
    vocab, smoothing = 11, 0.1
    logits = torch.randn(3, 6, vocab, generator=g, dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 4, 2, 0, 0, 0], [1, 3, 3, 8, 9, 2]])
    labels = lm_labels(tokens, pad_token_id=0, prompt_length=2)
    per_sequence, count = [], 0
    for b in range(3):
        total = 0.0
        for t in range(5):  # logits at t predict token t + 1
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            log_p = logits[b, t] - torch.logsumexp(logits[b, t], 0)
            total = total - (1 - smoothing) * log_p[target] - smoothing * log_p.mean()
            count += 1
        per_sequence.append(total)
    torch.testing.assert_close(sequence_lm_loss(logits, labels, smoothing), torch.stack(per_sequence))
    torch.testing.assert_close(lm_loss(logits, labels, smoothing), sum(per_sequence) / count)
