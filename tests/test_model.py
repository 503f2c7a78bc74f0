"""The model against transformers' DeepseekV3ForCausalLM on the same random weights, and against itself:
absorbed vs expanded MLA, incremental decoding vs one full forward, MTP, sequence classification."""

import pytest
import torch
import transformers

import dsv3
from dsv3.config import ModelConfig
from dsv3.model import DeepseekV3ForCausalLM, PagedBatch, init_weights
from dsv3.kernels.reference import apply_rotary
from helpers import make_hf_checkpoint, tiny_config

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

CONFIGS = {
    "base": {},
    "q_lora_rank_null": {"q_lora_rank": None},
    "yarn": {"rope_scaling": YARN},
    "yarn_mscale_differs": {"rope_scaling": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}},
    "no_dense_layers": {"first_k_dense_replace": 0},
    "norm_topk_false_one_group": {"norm_topk_prob": False, "n_group": 1, "topk_group": 1},
    "eight_groups": {"n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 4},
    "not_interleaved": {"rope_interleave": False},
}
SEQ_LEN = 100  # longer than YaRN's original context of 32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    path, hf = make_hf_checkpoint(tmp_path, **CONFIGS[name])
    model = dsv3.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    err = relative_error(expected, got)
    print(f"{name}: max relative error {err:.2e}")
    assert err < 1e-4
    # Greedy continuation over 32 steps, token for token.
    with torch.no_grad():
        ref = hf.generate(ids[:1, :20], max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 20:].tolist()
    seq = ids[:1, :20]
    for _ in range(32):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq[0, 20:].tolist() == ref


def random_model(**overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config(**overrides)), dtype=torch.float32).eval()
    init_weights(model, 0.1)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": YARN}])
def test_absorbed_equals_expanded(overrides):
    model = random_model(**overrides)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 40, 64)
    positions = torch.arange(40).expand(2, 40)
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if hasattr(attn, "q_a_proj") else attn.q_proj(x)
    q_nope, q_pe = q.unflatten(-1, (attn.n_heads, -1)).split([attn.nope, attn.rope_dim], -1)
    latent, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.rope_dim], -1)
    latent = attn.kv_a_layernorm(latent)
    rope = model.model.rotary(positions)
    q_pe = apply_rotary(q_pe, rope, attn.interleaved)
    k_pe = apply_rotary(k_pe.unsqueeze(-2), rope, attn.interleaved).squeeze(-2)
    with torch.no_grad():
        expanded = attn.expanded(q_nope, q_pe, latent, k_pe, causal_offset=0)
        absorbed = attn.absorbed(q_nope, q_pe, latent, k_pe)
    err = relative_error(expanded, absorbed)
    print(f"absorbed vs expanded: {err:.2e}")
    assert err < 1e-5


def paged_step(model, caches, tables, ids_per_seq, starts_per_seq, block_size):
    """One engine-style step: flat tokens of several sequences, latents written to the paged cache."""
    ids, positions, slots, query_starts, context_lens = [], [], [], [0], []
    for seq_ids, start, table in zip(ids_per_seq, starts_per_seq, tables):
        ids += seq_ids
        positions += range(start, start + len(seq_ids))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + len(seq_ids))]
        query_starts.append(query_starts[-1] + len(seq_ids))
        context_lens.append(start + len(seq_ids))
    batch = PagedBatch(query_starts, torch.tensor(context_lens, dtype=torch.int32), torch.tensor(tables),
                       torch.tensor(slots), caches, decode_only=all(len(s) == 1 for s in ids_per_seq))
    with torch.no_grad():
        hidden = model.model(torch.tensor(ids), torch.tensor(positions), batch)
        return model.logits(hidden[[q - 1 for q in query_starts[1:]]])


@pytest.mark.parametrize("overrides,first_chunk", [
    ({}, (5, 3)),                                                           # fresh prompts of uneven length
    ({}, (4, 4)),                                                           # of one length: one attention call
    ({"q_lora_rank": None, "rope_scaling": YARN, "first_k_dense_replace": 0}, (5, 3))])
def test_incremental_decoding_equals_full_forward(overrides, first_chunk):
    """Chunked prefill + absorbed decode over a paged cache gives the logits of one full forward."""
    model = random_model(**overrides)
    block_size, lengths = 4, (13, 7)
    seqs = [torch.randint(0, 256, (n + 6,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    caches = [torch.zeros(16, block_size, model.config.latent_dim) for _ in model.model.layers]
    tables = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # Prefill in two chunks of uneven size, then decode the last 6 tokens one at a time, both sequences together.
    got = [[], []]
    cuts = [(0, first_chunk[0], lengths[0]), (0, first_chunk[1], lengths[1])]
    for chunk in (0, 1):
        paged_step(model, caches, tables, [s[c[chunk]:c[chunk + 1]] for s, c in zip(seqs, cuts)],
                   [c[chunk] for c in cuts], block_size)
    for step in range(6):
        logits = paged_step(model, caches, tables, [[s[n + step]] for s, n in zip(seqs, lengths)],
                            list(lengths[i] + step for i in range(2)), block_size)
        for i in range(2):
            got[i].append(logits[i])
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            full = model(torch.tensor([seq]))[0, lengths[i]:]
        err = relative_error(full, torch.stack(got[i]))
        print(f"incremental vs full, sequence {i}: {err:.2e}")
        assert err < 1e-5


def test_logits_to_keep():
    model = random_model()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=3), model(ids)[:, -3:], atol=1e-6)


def test_mtp_forward_predicts_from_shifted_inputs():
    model = random_model()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = model.mtp_forward(ids)
        hidden = model.model(ids)
        layer = model.mtp_layers[0]
        rope = model.model.rotary(torch.arange(11).expand(2, 11))
        by_hand = layer(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]), rope)
    assert logits.shape == (2, 11, 256)
    assert torch.allclose(logits, model.logits(by_hand))


def test_sequence_classification_pooling_matches_transformers(tmp_path):
    cfg = tiny_config(pad_token_id=2, num_labels=3)
    hf = transformers.DeepseekV3ForSequenceClassification(transformers.DeepseekV3Config(**cfg)).float().eval()
    hf.save_pretrained(tmp_path)
    from dsv3.checkpoint import load_model
    from dsv3.model import DeepseekV3ForSequenceClassification

    model = load_model(tmp_path, dtype=torch.float32, architecture=DeepseekV3ForSequenceClassification)
    ids = torch.randint(3, 256, (3, 10))
    ids[0, 7:] = 2   # right padding
    ids[1, :4] = 2   # left padding
    mask = (ids != 2).long()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    assert relative_error(expected, got) < 1e-4


def test_rotary_table_gives_the_computed_rotations_and_only_grows():
    """The engine's table of rotations (YaRN here) holds the values computed per step, to the bit; a second
    engine never replaces a table the first one's CUDA graphs read, and an outgrown one stays alive."""
    from dsv3.model.layers import Rotary

    rotary = Rotary(ModelConfig.from_dict(tiny_config(rope_scaling=YARN)))
    positions = torch.tensor([[0, 5, 17, 63], [1, 2, 3, 40]])
    computed = rotary(positions)
    rotary.cache(64)
    assert torch.equal(rotary(positions), computed)
    table = rotary.table
    rotary.cache(32)
    assert rotary.table is table
    rotary.cache(128)
    assert rotary.retired == [table] and torch.equal(rotary.table[:64], table)
    assert torch.equal(rotary(positions), computed)


def before_the_mixed_step(overrides: dict):
    """Five sequences of 12 tokens over a paged cache; sequences 0 and 1 prefilled 6 and 5 tokens, sequence 4 its
    first 3 (chunked). -> model, caches, tables, token ids, block size."""
    model = random_model(**overrides)
    block_size, n = 4, 5
    seqs = [torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(n)]
    caches = [torch.zeros(32, block_size, model.config.latent_dim) for _ in model.model.layers]
    tables = [[5 * s + b for b in range(5)] for s in range(n)]
    paged_step(model, caches, [tables[0], tables[1], tables[4]], [seqs[0][:6], seqs[1][:5], seqs[4][:3]],
               [0, 0, 0], block_size)
    return model, caches, tables, seqs, block_size


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": YARN}])
def test_mixed_step_equals_full_forward(overrides):
    """One continuous-batching step that mixes all three kinds of sequence (PrefillPlan): decoding ones, fresh
    prompts of two lengths (one length twice) and a later chunk of a chunked prefill; then every sequence decodes.
    Each sequence's logits are those of one full forward of its tokens."""
    model, caches, tables, seqs, block_size = before_the_mixed_step(overrides)
    # The mixed step: 0 and 1 decode one token each, 2 and 3 bring fresh prompts (7 and 4 tokens), 4 its next 5.
    chunks = [(6, 7), (5, 6), (0, 7), (0, 4), (3, 8)]
    logits = paged_step(model, caches, tables, [s[a:b] for s, (a, b) in zip(seqs, chunks)], [a for a, _ in chunks],
                        block_size)
    nxt = paged_step(model, caches, tables, [[s[b]] for s, (_, b) in zip(seqs, chunks)], [b for _, b in chunks],
                     block_size)
    for i, (seq, (_, b)) in enumerate(zip(seqs, chunks)):
        with torch.no_grad():
            full = model(torch.tensor([seq[:b + 1]]))[0, -2:]
        err = relative_error(full, torch.stack([logits[i], nxt[i]]))
        print(f"mixed step vs full, sequence {i}: {err:.2e}")
        assert err < 1e-5


def rows_step(model, caches, tables, ids_per_seq, starts_per_seq, block_size, expand: bool):
    """paged_step in rows mode (a CUDA graph's layout): every token its own attention row over its own context;
    expand: the rows carry their sequence's first row (PagedBatch.first_rows), so that fresh prompts attend
    expanded (MLA.rows_attention)."""
    ids, positions, slots, row_tables, context_lens, first_rows, last_rows = [], [], [], [], [], [], []
    for seq_ids, start, table in zip(ids_per_seq, starts_per_seq, tables):
        first = len(ids)
        for p in range(start, start + len(seq_ids)):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
            row_tables.append(table)
            context_lens.append(p + 1)
            first_rows.append(first)
        ids += seq_ids
        last_rows.append(len(ids) - 1)
    batch = PagedBatch(list(range(len(ids) + 1)), torch.tensor(context_lens, dtype=torch.int32),
                       torch.tensor(row_tables), torch.tensor(slots), caches, decode_only=True,
                       first_rows=torch.tensor(first_rows, dtype=torch.int32) if expand else None)
    with torch.no_grad():
        hidden = model.model(torch.tensor(ids), torch.tensor(positions), batch)
        return model.logits(hidden[last_rows])


@pytest.mark.parametrize("overrides,expand", [({}, True), ({}, False),
                                              ({"q_lora_rank": None, "rope_scaling": YARN}, True)])
def test_rows_mode_mixed_step_equals_full_forward(overrides, expand):
    """The mixed step of test_mixed_step_equals_full_forward in rows mode: decoding sequences, fresh prompts (the
    expanded form's rows when expand) and a later chunk (absorbed either way) in one flat batch of rows; each
    sequence's logits are those of one full forward."""
    model, caches, tables, seqs, block_size = before_the_mixed_step(overrides)
    chunks = [(6, 7), (5, 6), (0, 7), (0, 4), (3, 8)]    # per sequence, as in test_mixed_step_equals_full_forward
    order = [0, 2, 1, 3, 4]                               # a decode row first, a fresh prompt straight after it
    chunks = [chunks[i] for i in order]
    logits = rows_step(model, caches, [tables[i] for i in order], [seqs[i][a:b] for i, (a, b) in zip(order, chunks)],
                       [a for a, _ in chunks], block_size, expand)
    for k, (i, (_, b)) in enumerate(zip(order, chunks)):
        with torch.no_grad():
            full = model(torch.tensor([seqs[i][:b]]))[0, -1]
        err = relative_error(full, logits[k])
        print(f"rows-mode mixed step vs full, sequence {i}: {err:.2e}")
        assert err < 1e-5
