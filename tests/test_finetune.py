"""Fine-tuning: packing, assistant-only loss through the one training loop, LoRA merge, the stage."""

from __future__ import annotations

import json

import pytest
import torch

from stages.core.config import FinetuneConfig
from stages.core.errors import ConfigError, DataError
from stages.core.tracking import MemoryTracker
from stages.executor import run_stage
from stages.finetune import apply_lora, load_conversations, merge_lora
from stages.lm.chat import ChatTemplate, read_chat_jsonl
from stages.lm.model import GPT
from stages.lm.targets import IGNORE
from stages.lm.tasks import is_heldout
from stages.training.chat_batches import PackedBatches, ReplayMix, pack
from stages.training.checkpoint_format import load_model
from stages.training.loop import Display, train
from tests._numeric import rtol_for
from tests._sft_fixtures import CharTokenizer, micro_config, tiny_gpt

QUIET = Display(progress=False)  # no progress lines in the test output

torch.set_num_threads(1)


def _conversation(tail: str) -> list[dict]:
    # The trailing user turn comes after every assistant token: causal attention means it
    # cannot influence an assistant prediction, so only the loss mask decides whether it counts.
    return [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "Reverse: a b c"},
        {"role": "assistant", "content": "c b a"},
        {"role": "user", "content": tail},
    ]


def test_pack_keeps_conversations_whole_and_masks_padding():
    tok = CharTokenizer()
    template = ChatTemplate(tok)
    rendered = [template.render(_conversation("x" * n)) for n in (1, 5, 20, 2)]
    x, y = pack(rendered, 64, tok.pad_id)
    assert x.shape[1] == y.shape[1] == 63
    # Every assistant token (and its <|end|>) is a target exactly once; nothing else is.
    expected = sum(sum(r.mask) for r in rendered)
    assert int((y != IGNORE).sum()) == expected
    answer = tok.encode("c b a") + [tok.special["<|end|>"]]
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        kept = [t for t in row_y if t != IGNORE]
        assert len(kept) % len(answer) == 0 and kept == answer * (len(kept) // len(answer))
        # Each row starts at a conversation boundary, and padding is never a target.
        assert row_x[0] == tok.special["<|system|>"]
        pads = [i for i, t in enumerate(row_x) if t == tok.pad_id]
        assert all(row_y[i] == IGNORE for i in pads)


def test_packed_batches_are_a_pure_function_of_step():
    x = torch.arange(50).view(10, 5)
    batches = PackedBatches(x, x.clone(), batch_size=4, grad_accum=2, seed=0)
    again = PackedBatches(x, x.clone(), batch_size=4, grad_accum=2, seed=0)
    assert torch.equal(batches.get(7, 1)[0], again.get(7, 1)[0])
    seen = torch.cat([batches.get(0, 0)[0], batches.get(0, 1)[0], batches.get(1, 0)[0]])[:10]
    assert sorted(seen[:, 0].tolist()) == list(range(0, 50, 5))  # first epoch covers every row once


def _train_on(tail: str, mask: bool, steps: int = 3) -> GPT:
    tok = CharTokenizer()
    template = ChatTemplate(tok)
    rendered = template.render(_conversation(tail))
    if not mask:
        rendered.mask = [True] * len(rendered.mask)
    x, y = pack([rendered] * 2, 64, tok.pad_id)
    model = tiny_gpt(tok.vocab_size, block_size=64, seed=5)
    cfg = FinetuneConfig(max_steps=steps, batch_size=2, warmup_steps=0, lr=1e-2, device="cpu", eval_interval=100)
    train(model, PackedBatches(x, y, 2, 1, seed=0), cfg, MemoryTracker(), display=QUIET)
    return model


def test_non_assistant_tokens_stay_out_of_the_loss():
    a = _train_on("first trailing question", mask=True)
    b = _train_on("a different one!", mask=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # the changed user text contributed no gradient at all
    # Control: without the mask the same change does alter training.
    c = _train_on("first trailing question", mask=False)
    d = _train_on("a different one!", mask=False)
    assert any(not torch.equal(pc, pd) for pc, pd in zip(c.parameters(), d.parameters()))


def test_lora_merge_matches_unmerged_logits():
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=120, block_size=32, seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(method="lora", lora_r=4, lora_alpha=8.0)
    peft_model = apply_lora(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; make the adapters do something
    probe = torch.randint(0, 120, (2, 16))
    merged, delta = merge_lora(peft_model, probe)
    assert isinstance(merged, GPT)
    with torch.no_grad():
        assert delta <= rtol_for(torch.float32) * max(1.0, float(merged(probe).abs().max()))
    assert set(merged.state_dict()) == set(base)  # a plain GPT again: no adapter names
    changed = [k for k in base if not torch.equal(base[k], merged.state_dict()[k])]
    assert any("qkv" in k for k in changed)


def test_unknown_lora_target_is_a_config_error():
    with pytest.raises(ConfigError, match="finetune.lora_targets"):
        apply_lora(tiny_gpt(50), FinetuneConfig(method="lora", lora_targets=["attention"]))


def test_jsonl_data_is_split_and_bad_files_refused(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"prompt": f"say {i}", "response": str(i)}) for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    train_set, heldout = load_conversations(FinetuneConfig(data=str(path), heldout_items=5))
    assert len(train_set) == 15 and len(heldout) == 5
    assert not {json.dumps(h["messages"]) for h in heldout} & {json.dumps(m) for m in train_set}
    path.write_text("\n".join(lines[:10] + ["oops"] * 2) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:11"):
        load_conversations(FinetuneConfig(data=str(path), max_bad_fraction=0.1))


def test_finetune_stage_full_and_lora_through_the_executor(tmp_path, micro_upstream):
    store, refs = micro_upstream()
    cfg = micro_config()
    result = run_stage("finetune", cfg, refs, store)
    out = result.ref.uri
    metrics = result.manifest.metrics
    assert metrics["method"] == "full" and metrics["steps"] == cfg.finetune.max_steps
    assert metrics.keys() >= {"final_train_loss", "final_val_loss", "tokens_per_s"}  # the names pretrain reports
    assert metrics["train_conversations"] == cfg.finetune.train_items
    model = load_model(f"{out}/model")
    assert isinstance(model, GPT)
    assert len(read_chat_jsonl(f"{out}/heldout.jsonl")) == cfg.finetune.heldout_items
    records = [json.loads(line) for line in open(f"{out}/heldout.jsonl")]
    assert all(is_heldout(r["task"], r["messages"][0]["content"]) for r in records)
    curve = json.loads(open(f"{out}/curve.json").read())
    assert any("train_loss" in p for p in curve) and any("val_loss" in p for p in curve)
    assert run_stage("finetune", cfg, refs, store).reused

    lora_cfg = micro_config("finetune.method=lora", "finetune.lora_r=4")
    lora = run_stage("finetune", lora_cfg, refs, store)
    assert lora.ref.uri != out
    merged = load_model(f"{lora.ref.uri}/model").eval()
    with torch.no_grad():  # the merge error, against the size of the logits it perturbs
        scale = float(merged(torch.randint(0, merged.cfg.vocab_size, (4, 16))).abs().max())
    assert lora.manifest.metrics["lora_merge_max_abs_dlogits"] <= rtol_for(torch.float32) * max(1.0, scale)
    assert lora.manifest.metrics["trainable_params"] < metrics["trainable_params"]
    merged = load_model(f"{lora.ref.uri}/model")
    assert set(merged.state_dict()) == set(model.state_dict())


def test_replay_rows_are_whole_windows_of_pretraining_text_after_the_chat_rows(micro_upstream):
    from stages import registry

    def stage_inputs(name, cfg):
        return registry.stage(name).inputs_for(cfg.sections(name))

    from stages.storage.shards import TokenShards
    from stages.training.batches import RandomWindows
    from stages.training.replay import replay_rows

    store, refs = micro_upstream()
    cfg = micro_config()
    assert replay_rows(cfg.finetune.replay_fraction, cfg.finetune.batch_size) == 1
    assert "data" in stage_inputs("finetune", cfg)
    assert stage_inputs("finetune", micro_config("finetune.replay_fraction=0")) == ("tokenizer", "pretrain")
    with pytest.raises(ConfigError, match="replay_fraction"):  # checked with the recipe, before anything runs
        micro_config("finetune.batch_size=2", "finetune.replay_fraction=0.9")

    text = TokenShards(store.materialize(refs["data"]), "train")
    chat_x = torch.arange(7 * 64).reshape(7, 64) % 50
    chat_y = torch.full((7, 64), IGNORE)
    mix = ReplayMix(PackedBatches(chat_x, chat_y, 7, 1, seed=0), RandomWindows(text, 64, 1, seed=1))
    x, y = mix.get(step=3, micro=0)
    assert x.shape == y.shape == (8, 64)
    assert (y[:7] == IGNORE).all()  # chat rows: only what the template marks is trained
    assert (y[7] != IGNORE).all() and torch.equal(x[7, 1:], y[7, :-1])  # a text window trains every token
    assert torch.equal(mix.get(3, 0)[0], x)  # a pure function of (step, micro): resume stays exact

    result = run_stage("finetune", cfg, refs, store)
    assert result.manifest.metrics["replay_rows"] == 1
    assert "data" in result.manifest.inputs
