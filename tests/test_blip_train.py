"""BLIP's training forward (models/blip.py): the three losses and their gradients, the momentum encoders' EMA
and the feature queue, ITC against a hand-written InfoNCE, two DDP processes against one holding the whole
batch, a short overfit on shapes images, and a state-dict round trip of the training state. BLIP-tiny."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from crossmodal.data.shapes import ShapesDataset
from crossmodal.data.tokenizer import BertTokenizer
from crossmodal.models import create_model, load_blip_vision
from crossmodal.models.blip import BLIP, BLIP_MODELS, build_blip
from tests.multiprocess import run_on_processes
from crossmodal import recipes

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "and", "on", "of", "the", "with", "in"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def shapes_batch(tmp_path, size: int) -> tuple[torch.Tensor, torch.Tensor, BertTokenizer]:
    """`size` shapes images (B, 3, 64, 64) and their captions, tokenized with a vocabulary of their words."""
    items = [ShapesDataset("train", image_size=64, length=size)[i] for i in range(size)]
    words = sorted({word for item in items for word in item["caption"].lower().replace(".", " ").replace(",", " ").split()})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB + [word for word in words if word not in VOCAB]) + "\n")
    tokenizer = BertTokenizer(vocab, context_length=24)
    images = torch.stack([torch.from_numpy(np.array(item["image"])).permute(2, 0, 1) for item in items])
    images = (images.float() / 255 - 0.5) / 0.25  # (B, 3, 64, 64)
    return images, tokenizer([item["caption"] for item in items]), tokenizer


def tiny(tokenizer, queue_size: int = 16, seed: int = 0, preset: str = "BLIP-tiny", **overrides) -> BLIP:
    torch.manual_seed(seed)
    config = dataclasses.replace(BLIP_MODELS[preset], momentum_encoders=True, queue_size=queue_size, **overrides)
    return build_blip(config, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("shapes"), 8)


TOWERS = ["BLIP-tiny", "BLIP-RN-tiny"]  # ViT; CLIP's ResNet with attention-pooled tokens


@pytest.mark.parametrize("preset", TOWERS)
def test_losses_are_finite_and_only_online_parameters_get_gradients(batch, preset):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, preset=preset)
    losses = model(images, tokens, alpha=0.4)
    assert sorted(losses) == ["itc", "itm", "lm"]
    assert all(loss.ndim == 0 and loss.isfinite() for loss in losses.values())
    sum(losses.values()).backward()
    momentum = {name for name, _ in model.named_parameters() if name.split(".")[0].endswith("_m")}
    assert momentum and all(name.split(".")[0] in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m") for name in momentum)
    for name, param in model.named_parameters():
        if name in momentum:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name  # DDP: all used
            # CLIP's ResNet init zeroes each bottleneck's last BatchNorm gamma: its branch gets gradient from step 2
            in_branch = name.startswith("visual_encoder.layer") and ".bn3." not in name and ".downsample." not in name
            assert in_branch or param.grad.abs().sum() > 0, name


def test_momentum_encoders_follow_the_ema_and_the_queue_holds_their_features(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=16).eval()  # no dropout: the momentum features can be recomputed
    with torch.no_grad():  # move the online weights away from the copies
        for param in model.momentum_pairs(online=True):
            param.add_(0.01 * torch.randn_like(param))
    online = [p.clone() for p in model.momentum_pairs(online=True)]
    before = [p.clone() for p in model.momentum_pairs(online=False)]
    model(images[:4], tokens[:4])
    for param, old, param_m in zip(online, before, model.momentum_pairs(online=False)):
        torch.testing.assert_close(param_m, 0.995 * old + 0.005 * param)
    model(images[4:], tokens[4:])
    with torch.no_grad():
        image_feat_m = F.normalize(model.vision_proj_m(model.visual_encoder_m.forward_features(images[4:])[:, 0]), dim=-1)
        text_states_m = model.text_encoder_m(tokens[4:], padding_mask=tokens[4:] != model.pad_id)
        text_feat_m = F.normalize(model.text_proj_m(text_states_m[:, 0]), dim=-1)
    assert int(model.queue.ptr) == 8
    torch.testing.assert_close(model.queue.image_queue[:, 4:8], image_feat_m.T)
    torch.testing.assert_close(model.queue.text_queue[:, 4:8], text_feat_m.T)


def test_itc_without_distillation_or_queue_is_infonce(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=0).eval()  # momentum copies equal the online encoders at the first step
    loss = model(images, tokens, alpha=0.0)["itc"]
    with torch.no_grad():
        image_feat, text_feat = model.encode_image(images), model.encode_text(tokens)
        logits = image_feat @ text_feat.T / model.temp  # (B, B)
        labels = torch.arange(len(images))
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_image_ids_make_all_captions_of_an_image_positives(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=0).eval()
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images = images[ids]  # two captions per image
    loss = model(images, tokens, image_ids=ids, alpha=0.0)["itc"]
    with torch.no_grad():
        logits = model.encode_image(images) @ model.encode_text(tokens).T / model.temp  # (B, B)
        targets = (ids[:, None] == ids[None, :]).float() / 2
        expected = (-(logits.log_softmax(1) * targets).sum(1).mean() - (logits.T.log_softmax(1) * targets).sum(1).mean()) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_hard_negatives_follow_the_global_rng(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer).eval()
    state = model.state_dict()
    torch.manual_seed(5)
    first = model(images, tokens)["itm"]
    model.load_state_dict(state)
    torch.manual_seed(5)
    torch.testing.assert_close(model(images, tokens)["itm"], first, rtol=0, atol=0)


def _ddp_step(rank, world_size, images, tokens, tokenizer, preset):
    model = tiny(tokenizer, queue_size=8, preset=preset).eval()  # same seed on every rank: the same weights and queue
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every trainable parameter is used
    local = slice(rank * 2, (rank + 1) * 2)
    losses = ddp(images[local], tokens[local])
    sum(losses.values()).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    ddp(images[local], tokens[local])  # DDP raises here if the last backward left a parameter without gradient
    return {name: loss.detach() for name, loss in losses.items()}, grads


@pytest.mark.parametrize("preset", TOWERS)  # eval mode: dropout off, BatchNorm on its running statistics
def test_two_ddp_processes_equal_one_with_the_whole_batch(batch, preset):
    """ITC's columns are the gathered global batch, so its loss and gradient equal one process's; ITM is
    deterministic with two pairs per rank (each has one negative candidate) and is compared per half."""
    images, tokens, tokenizer = batch
    images, tokens = images[:4], tokens[:4]
    per_rank = run_on_processes(_ddp_step, 2, images, tokens, tokenizer, preset)
    model = tiny(tokenizer, queue_size=8, preset=preset).eval()
    itc = model(images, tokens)["itc"]
    itc.backward()  # before the next forward, which clamps `temp` in place
    for half in (slice(0, 2), slice(2, 4)):
        losses = model(images[half], tokens[half])
        ((losses["itm"] + losses["lm"]) / 2).backward()
    torch.testing.assert_close(sum(losses["itc"] for losses, _ in per_rank) / 2, itc.detach())
    for name, param in model.named_parameters():
        if param.requires_grad:
            for _, grads in per_rank:  # DDP's all-reduced average, the same on both ranks
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("preset", TOWERS)
def test_overfit_lowers_every_loss(batch, preset):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=16, preset=preset)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.05)
    history = []
    for step in range(30):
        losses = model(images, tokens, alpha=0.4 * min(1, step / 10))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: loss.item() for name, loss in losses.items()})
    for name in ("itc", "itm", "lm"):
        first, last = np.mean([h[name] for h in history[:3]]), np.mean([h[name] for h in history[-3:]])
        assert last < first, f"{name}: {first:.3f} -> {last:.3f}"


def test_state_dict_round_trip_resumes_exactly(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        sum(model(images, tokens).values()).backward()
        optimizer.step()
    state = model.state_dict()
    assert {"queue.image_queue", "queue.text_queue", "queue.idx_queue", "queue.ptr"} <= set(state)
    assert any(key.startswith("visual_encoder_m.") for key in state) and any(key.startswith("text_proj_m.") for key in state)
    resumed = tiny(tokenizer, queue_size=16, seed=1)
    resumed.load_state_dict(state)  # strict
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    losses = []
    for net in (model, resumed):
        torch.manual_seed(7)  # dropout and hard negatives
        losses.append({name: loss.detach() for name, loss in net(images, tokens).items()})
        assert int(net.queue.ptr) == 8
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=0, atol=0)


def test_released_weights_get_momentum_encoders_after_loading(batch, tmp_path):
    images, tokens, tokenizer = batch
    torch.save({"model": create_model("BLIP-tiny", tokenizer=tokenizer).state_dict()}, tmp_path / "tiny.pth")
    model = create_model("BLIP-tiny", pretrained=tmp_path / "tiny.pth", tokenizer=tokenizer, grad_checkpointing=True)
    with pytest.raises(RuntimeError, match="add_momentum_encoders"):
        model(images, tokens)
    model.add_momentum_encoders(queue_size=8)
    for param, param_m in zip(model.momentum_pairs(online=True), model.momentum_pairs(online=False)):
        assert torch.equal(param, param_m) and not param_m.requires_grad
    assert model.visual_encoder.transformer.grad_checkpointing and not model.visual_encoder_m.transformer.grad_checkpointing
    assert not model.text_encoder_m.transformer.grad_checkpointing
    losses = model(images, tokens)
    assert sorted(losses) == ["itc", "itm", "lm"]
    sum(losses.values()).backward()


def test_resnet_tower_starts_from_a_clip_run_and_its_pooled_token_is_clips_embedding(batch, tmp_path):
    """model.vision_checkpoint: a CLIP RN-tiny run's image tower loads into BLIP-RN-tiny's, whose first image token is
    then exactly CLIP's image embedding (the attention pool's mean-token query); a tower of another kind is refused."""
    images, tokens, tokenizer = batch
    torch.manual_seed(3)
    clip = create_model("RN-tiny").eval()
    torch.save({"model": clip.state_dict(), "config": {}}, tmp_path / "clip.pt")  # what train.py writes, in short
    model = tiny(tokenizer, preset="BLIP-RN-tiny").eval()
    load_blip_vision(model, str(tmp_path / "clip.pt"))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_image(images)[:, 0], clip.visual(images), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        load_blip_vision(tiny(tokenizer), str(tmp_path / "clip.pt"))


def test_locked_tower_does_not_move_and_is_its_own_momentum_copy(batch):
    """lock_vision: no gradient, BatchNorm statistics frozen through train(), and ITC's momentum image features are
    the online tower's CLS token through vision_proj_m."""
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, preset="BLIP-RN-tiny", queue_size=16)
    model.lock_vision()
    before = {key: value.clone() for key, value in model.visual_encoder.state_dict().items()}  # BN buffers too
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model.train()
        optimizer.zero_grad()
        sum(model(images, tokens).values()).backward()
        optimizer.step()
    assert not model.visual_encoder.training and all(param.grad is None for param in model.visual_encoder.parameters())
    for key, value in model.visual_encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        expected = F.normalize(model.vision_proj_m(model.forward_image(images)[:, 0]), dim=-1)
    torch.testing.assert_close(model.queue.image_queue[:, 8:16].T, expected, rtol=1e-6, atol=1e-6)  # the last enqueue


def test_run_config_loads_and_locks_the_tower_with_sync_bn(batch, tmp_path):
    """model_from_config: model.vision_checkpoint fills the tower, model.sync_bn converts its BatchNorm and
    blip.lock_vision then freezes all of it (converted layers included) before the momentum copies."""
    from crossmodal.config import Config
    from crossmodal.recipes import model_from_config
    from crossmodal.models.batchnorm import SyncBatchNorm2d

    _, _, tokenizer = batch
    torch.manual_seed(3)
    clip = create_model("RN-tiny")
    torch.save({"model": clip.state_dict(), "config": {}}, tmp_path / "clip.pt")
    cfg = Config()
    cfg.model.name, cfg.model.vision_checkpoint, cfg.model.sync_bn = "BLIP-RN-tiny", str(tmp_path / "clip.pt"), True
    cfg.blip.lock_vision, cfg.blip.queue_size, cfg.data.image_size = True, 0, 64
    model = model_from_config(cfg, tokenizer)
    assert any(isinstance(module, SyncBatchNorm2d) for module in model.visual_encoder.modules())
    assert not any(param.requires_grad for param in model.visual_encoder.parameters())
    assert torch.equal(model.visual_encoder.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(model.visual_encoder_m.attnpool.c_proj.weight, clip.visual.attnpool.c_proj.weight)


def test_text_dropout_comes_from_the_run_config(batch):
    """blip.text_drop sets the text stack's hidden and attention dropout (BERT's 0.1 by default); 1 is refused."""
    from crossmodal import train
    from crossmodal.config import Config
    from crossmodal.recipes import model_from_config

    _, _, tokenizer = batch
    cfg = Config()
    cfg.model.name, cfg.blip.queue_size, cfg.data.image_size = "BLIP-tiny", 0, 64
    for rate in (0.1, 0.0):
        cfg.blip.text_drop = rate
        model = model_from_config(cfg, tokenizer)
        for stack in (model.text_encoder, model.text_decoder, model.text_encoder_m):
            assert {m.p for m in stack.modules() if isinstance(m, torch.nn.Dropout)} == {rate}
            assert {m.attn_drop for m in stack.modules() if hasattr(m, "attn_drop")} == {rate}
    cfg.blip.text_drop = 1.0
    assert "blip.text_drop must lie in [0, 1); got 1.0" in recipes.check_config(recipes.resolve(cfg))


def test_bfloat16_autocast_gives_finite_losses(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images[:4], tokens[:4])
    assert all(loss.dtype == torch.float32 and loss.isfinite() for name, loss in losses.items() if name != "lm")
    assert losses["lm"].isfinite()


def test_captioner_without_text_encoder_trains_lm_with_the_prompt_masked(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, tie_text_decoder=False).eval()
    model.text_encoder = model.text_encoder_m = model.queue = None  # as a captioning checkpoint
    losses = model(images, tokens, prompt_length=3)
    assert list(losses) == ["lm"]
    logits = model.decoder_logits(tokens, model.forward_image(images))  # (B, T, vocab)
    labels = tokens.masked_fill(tokens == model.pad_id, -100)
    labels[:, :3] = -100
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1)
    torch.testing.assert_close(losses["lm"], expected)


def test_retriever_without_decoder_trains_itc_and_itm(batch):
    images, tokens, tokenizer = batch
    model = tiny(tokenizer)
    model.text_decoder = model.lm_head = None  # as a retrieval checkpoint
    losses = model(images[:4], tokens[:4])
    assert sorted(losses) == ["itc", "itm"]
    sum(losses.values()).backward()
    assert all(param.grad is not None for param in model.parameters() if param.requires_grad)


def test_question_rows_teach_the_decoder_only_the_answer(tmp_path):
    """blip.qa_fraction: Collate turns a fixed share of the images (by key) into "question: q answer: a"
    decoder rows whose LM labels are the answer and eos only; the model's LM loss is then over those rows."""
    from crossmodal.data import Collate
    from crossmodal.data.vqa import VQA_PROMPT

    dataset = ShapesDataset("train", image_size=64, length=40)
    items = [dataset[i] for i in range(40)]
    texts = [item[key] for item in items for key in ("caption", "question", "answer")] + [VQA_PROMPT]
    words = sorted({word for text in texts for word in text.lower().replace(".", " ").replace(",", " ")
                    .replace("?", " ").replace(":", " ").split()})
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB + ["?", ":"] + [w for w in words if w not in VOCAB]) + "\n")
    tokenizer = BertTokenizer(tmp_path / "vocab.txt", context_length=24)
    samples = [{"image": torch.from_numpy(np.array(item["image"])).permute(2, 0, 1).float() / 255 - 0.5,
                "caption": item["caption"], "question": item["question"], "answer": item["answer"], "label": 0,
                "key": item["key"], "index": i, "bad": 0, "seen": 1, "bad_examples": []} for i, item in enumerate(items)]
    batch = Collate(tokenizer, qa_fraction=0.5)(samples)
    chosen = batch["prompt_lengths"] > 0
    assert 5 < int(chosen.sum()) < 35  # about half
    assert torch.equal(batch["decoder_tokens"][~chosen], batch["tokens"][~chosen])
    for row, length, sample in zip(batch["decoder_tokens"][chosen], batch["prompt_lengths"][chosen],
                                   [s for s, c in zip(samples, chosen) if c]):
        prompt = tokenizer(VQA_PROMPT.format(sample["question"]))[0]
        assert row[:length].tolist() == prompt[: int(length)].tolist()  # [CLS] question: q answer:
        labels = row[1:][row[1:] != tokenizer.pad_id].tolist()[int(length) - 1 :]
        assert labels == tokenizer.encode(sample["answer"]) + [tokenizer.eos_id]
    # the choice follows the key, whatever else is in the batch (world size, resume)
    reversed_batch = Collate(tokenizer, qa_fraction=0.5)(samples[::-1])
    assert torch.equal(reversed_batch["decoder_tokens"].flip(0), batch["decoder_tokens"])

    model = tiny(tokenizer)
    images = torch.stack([s["image"] for s in samples[:8]])
    decoder_tokens, prompt_lengths = batch["decoder_tokens"][:8], batch["prompt_lengths"][:8]
    model.eval()  # no dropout: the loss's logits are the ones recomputed below
    losses = model(images, batch["tokens"][:8], decoder_tokens=decoder_tokens, prompt_length=prompt_lengths)
    logits = model.decoder_logits(decoder_tokens, model.forward_image(images))
    labels = decoder_tokens.masked_fill(decoder_tokens == model.pad_id, -100)
    for i, length in enumerate(prompt_lengths.tolist()):
        labels[i, :length] = -100
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1)
    torch.testing.assert_close(losses["lm"], expected)


def test_swapped_captions_are_more_itm_negatives(batch):
    """blip.swap_negatives: the S swapped rows join ITM's 2B hard negatives in one mean cross-entropy."""
    images, tokens, tokenizer = batch
    model = tiny(tokenizer, queue_size=0, text_drop=0.0)
    model.eval()  # (no dropout; ITC, ITM and their negatives are the same either way)
    index = torch.tensor([1, 4, 6])
    swapped = tokens[[2, 0, 3]]  # other images' captions stand in for swapped ones
    torch.manual_seed(1)
    plain = model(images, tokens, alpha=0.4)["itm"]
    torch.manual_seed(1)
    with_swapped = model(images, tokens, alpha=0.4, swapped=(index, swapped))["itm"]
    with torch.no_grad():
        logits = model.itm_head(model.forward_multimodal(swapped, model.forward_image(images)[index])[:, 0])
    extra = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long), reduction="sum")
    rows = 3 * len(images)
    torch.testing.assert_close(with_swapped, (plain * rows + extra) / (rows + 3), rtol=1e-5, atol=1e-6)


def test_swap_negatives_needs_itm_and_shapes():
    from crossmodal.config import Config

    cfg = Config()
    cfg.model.name, cfg.blip.queue_size, cfg.data.image_size, cfg.blip.swap_negatives = "BLIP-tiny", 0, 64, True
    assert recipes.check_config(recipes.resolve(cfg)) is None
    cfg.blip.losses = "itc,lm"
    assert "blip.swap_negatives trains ITM" in recipes.check_config(recipes.resolve(cfg))
    cfg.blip.losses, cfg.data.train = "itc,itm,lm", "csv:pairs.csv"
    assert "data.train=csv:pairs.csv" in recipes.check_config(recipes.resolve(cfg))


def test_stage_tokens_are_the_third_stage_cells_and_train_under_a_locked_tower(batch, tmp_path):
    """blip.token_stride=16: the pooled token is still CLIP's image embedding, and the 16 cells after it are the
    CLIP tower's third stage (recomputed here layer by layer), normalised, projected and given a position; with
    the tower locked, they are what trains on the image side."""
    from crossmodal.config import Config
    from crossmodal.recipes import model_from_config

    images, tokens, tokenizer = batch
    torch.manual_seed(3)
    clip = create_model("RN-tiny").eval()
    torch.save({"model": clip.state_dict(), "config": {}}, tmp_path / "clip.pt")
    cfg = Config()
    cfg.model.name, cfg.model.vision_checkpoint = "BLIP-RN-tiny", str(tmp_path / "clip.pt")
    cfg.blip.lock_vision, cfg.blip.queue_size, cfg.data.image_size, cfg.blip.token_stride = True, 0, 64, 16
    model = model_from_config(cfg, tokenizer).eval()
    tower, cells = clip.visual, model.stage_tokens
    with torch.no_grad():
        x = images
        for conv, bn in ((tower.conv1, tower.bn1), (tower.conv2, tower.bn2), (tower.conv3, tower.bn3)):
            x = torch.relu(bn(conv(x)))
        x = tower.layer3(tower.layer2(tower.layer1(tower.avgpool(x))))  # (B, 256, 4, 4)
        x = x.flatten(2).transpose(1, 2)  # (B, 16, 256), row-major cells
        expected = F.layer_norm(x, (256,), cells.norm.weight, cells.norm.bias) @ cells.proj.weight.T + cells.proj.bias
        expected = expected + cells.positional_embedding
        image_tokens = model.forward_image(images)
    assert image_tokens.shape == (8, 17, 128)
    torch.testing.assert_close(image_tokens[:, 0], clip.visual(images), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(image_tokens[:, 1:], expected, rtol=1e-5, atol=1e-5)
    model.train()
    sum(model(images, tokens).values()).backward()
    assert all(param.grad is None for param in model.visual_encoder.parameters())
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in cells.parameters())
    cfg.model.vision_checkpoint = ""  # checks of the values alone
    assert recipes.check_config(recipes.resolve(cfg)) is None
    cfg.model.name = "BLIP-tiny"  # a ViT has no third stage
    assert "blip.token_stride must be 32" in recipes.check_config(recipes.resolve(cfg))
