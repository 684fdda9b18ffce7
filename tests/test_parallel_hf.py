"""Hugging Face models with context-parallel attention (2 gloo ranks) give the logits, loss and gradients of
the same model on one process: a tiny Qwen2 (dense sequence and packed documents) and a tiny Eagle 2.5
(image features spliced into the text, then the language model run context-parallel on sharded embeddings)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from longvl.parallel import gather, init_cp_mesh, plan_for, shard
from longvl.parallel.hf import ATTENTION_NAME, CPSequence
from tests.distributed import run_distributed

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32 model; CP changes only the summation order


def tiny_qwen2(attn_implementation):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(config).float()


def shifted_labels(ids, lengths):
    """Next-token labels, -100 at each document's last token (no prediction across documents)."""
    labels = torch.roll(ids, -1, dims=1)
    for end in torch.tensor(lengths).cumsum(0):
        labels[:, end - 1] = -100
    return labels


def single_process(ids, lengths, labels):
    """Logits, summed loss and grads of the plain model, one document at a time."""
    model = tiny_qwen2("eager")
    logits = torch.cat([model(input_ids=doc).logits for doc in ids.split(lengths, dim=1)], dim=1)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _compare(rank, world_size):
    _, groups = init_cp_mesh("cpu", cp_size=world_size)
    for lengths, algorithm in (([29], "ring"), ([13, 3, 24], "ulysses"), ([13, 3, 24], "allgather")):
        torch.manual_seed(1)
        ids = torch.randint(0, 101, (1, sum(lengths)))
        labels = shifted_labels(ids, lengths)
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        ref_logits, ref_loss, ref_grads = single_process(ids, lengths, labels)

        plan = plan_for(lengths, groups, algorithm)
        model = tiny_qwen2(ATTENTION_NAME)
        sequence = CPSequence(groups, plan, algorithm)
        logits = model(input_ids=shard(ids, plan, rank), position_ids=shard(positions, plan, rank),
                       context_parallel=sequence).logits
        loss = F.cross_entropy(logits.flatten(0, 1), shard(labels, plan, rank, pad_value=-100).flatten(),
                               ignore_index=-100, reduction="sum")
        loss.backward()
        dist.all_reduce(loss)
        torch.testing.assert_close(gather(logits.detach(), plan, groups.cp), ref_logits, **TOL)
        torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
        for name, param in model.named_parameters():
            dist.all_reduce(param.grad)
            torch.testing.assert_close(param.grad, ref_grads[name], **TOL, msg=f"{algorithm} {lengths} {name}")
    return groups


def _eagle_embeddings(model, ids, pixels):
    embeds = model.get_input_embeddings()(ids)
    return model.splice_image_features(ids, embeds, model.extract_features(pixels))


def _compare_eagle(rank, groups):
    from longvl.eagle.configuration_eagle import tiny_eagle_config
    from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

    image_token = 99
    torch.manual_seed(2)
    ids = torch.randint(0, 90, (1, 30))
    ids[0, 5:13] = image_token  # two tiles of 4 tokens
    pixels = torch.randn(2, 3, 56, 56)
    labels = shifted_labels(ids, [30])

    def build(attn_implementation):
        torch.manual_seed(0)
        model = EagleForConditionalGeneration(tiny_eagle_config(101, image_token)).float()
        model.language_model.config._attn_implementation = attn_implementation
        return model

    ref = build("eager")
    ref_logits = ref(inputs_embeds=_eagle_embeddings(ref, ids, pixels)).logits
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()

    model = build(ATTENTION_NAME)
    plan = plan_for(30, groups, "ulysses")
    embeds = shard(_eagle_embeddings(model, ids, pixels), plan, rank)
    logits = model(inputs_embeds=embeds, position_ids=shard(torch.arange(30)[None], plan, rank),
                   context_parallel=CPSequence(groups, plan, "ulysses")).logits
    F.cross_entropy(logits.flatten(0, 1), shard(labels, plan, rank, pad_value=-100).flatten(),
                    ignore_index=-100, reduction="sum").backward()
    torch.testing.assert_close(gather(logits.detach(), plan, groups.cp), ref_logits.detach(), **TOL)
    for (name, param), ref_param in zip(model.named_parameters(), ref.parameters()):
        if ref_param.grad is not None:
            dist.all_reduce(param.grad)
            torch.testing.assert_close(param.grad, ref_param.grad, **TOL, msg=f"eagle {name}")


def _compare_all(rank, world_size):
    groups = _compare(rank, world_size)
    _compare_eagle(rank, groups)


def test_hf_models_context_parallel_match_single_process():
    run_distributed(_compare_all, 2, timeout=120)


def test_the_sequence_layout_must_be_given():
    import pytest

    model = tiny_qwen2(ATTENTION_NAME)
    with pytest.raises(ValueError, match="context_parallel=CPSequence"):
        model(input_ids=torch.randint(0, 101, (1, 8)))
