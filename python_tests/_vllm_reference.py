"""safeattn.generate references for the vLLM parity tests (runs in the main venv: the HF
decoder needs its transformers; the vLLM venv pins an older one).

``python _vllm_reference.py SPEC.json OUT_DIR`` builds each tiny model of SPEC (random weights,
random head and probe adapter; the llama one also a random query probe, the gemma3 one a
random response probe; ``<family>+ens``: no such probe, a head ensemble of two), saves it with
``save_pretrained`` + ``save_safety`` to ``OUT_DIR/<family>`` (a family in
``safeattn.models.MODELS``: that shipped model and head, not saved), and writes
``OUT_DIR/<family>/ref.json``: per case (a SafetyConfig) the greedy token ids, ``q_span`` and
the trace of every prompt (batch 1 each, so no padding); the same per ``prefill_cases`` for
the conversations of ``prefills`` (each ends with an assistant prefill).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safeattn  # noqa: E402
from safeattn.hf.adapter import attach_probe_adapter  # noqa: E402
from _hf_tiny import PrintedStreamer, tiny_config, tiny_tokenizer  # noqa: E402


def tiny_safe_model(family: str, seed: int = 0, extra_probe: bool = True):
    """A tiny random ``family`` model vLLM's CPU backend can run (head_dim 32), patched with a
    random head on layer 1 and a random rank-4 probe adapter (and with ``extra_probe`` a
    query or response probe, below)."""
    tok = tiny_tokenizer(chat=True)
    cfg, cls = tiny_config(family, len(tok.get_vocab()))
    kw = cfg.to_dict()
    kw.update(head_dim=32)
    if family == "gemma3_text":
        kw.update(query_pre_attn_scalar=32)
    cfg = cls.config_class(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model = safeattn.apply_safeattn(model, tok, cls_layer=1)
    ad = attach_probe_adapter(model, rank=4)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.3)
        model.safety_head.weight.normal_(0, 1.0)
        model.safety_head.bias.zero_()
    if not extra_probe:
        return model, tok
    # p_0 also from a query probe on the last block's output (llama); the decoding-time
    # checks also from a response probe on block 1's output (gemma3: the last probe layer,
    # so a folded probe's rows are still in its output)
    probe, spec, fill = (("query_probe", {"layer": cfg.num_hidden_layers}, (0.2, -0.5, 0.7))
                         if family == "llama" else
                         ("response_probe", {"layer": 2, "window": 4}, (0.3, -0.3, 0.8)))
    model.config.safeattn = dict(model.config.safeattn, **{probe: spec})
    model = safeattn.apply_safeattn(model, tok)
    with torch.no_grad():
        extra = getattr(model, f"safety_{probe}")
        extra.linear.weight.normal_(0, fill[0])
        extra.linear.bias.fill_(fill[1])
        extra.head_scale.fill_(fill[2])
    return model, tok


def tiny_ensemble(family: str, out: Path):
    """:func:`tiny_safe_model` (no query or response probe) saved to ``out`` with a head
    ensemble of two: its own head and a second random head, ``[CLS]`` row and adapter."""
    import tempfile

    model, tok = tiny_safe_model(family, extra_probe=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    with tempfile.TemporaryDirectory() as tmp:
        safeattn.save_safety(model, Path(tmp) / "m0")
        cls = safeattn.hf.cls_token_id(model)
        with torch.no_grad():
            for p in [*model.safety_adapter.parameters(), *model.safety_head.parameters()]:
                p.normal_(0, 0.3 if p.dim() > 1 else 0.5)
            model.get_input_embeddings().weight[cls].normal_(0, 0.2)
        safeattn.save_safety(model, Path(tmp) / "m1")
        safeattn.combine_safety([Path(tmp) / "m0", Path(tmp) / "m1"], out)
    safeattn.load_safety(model, out, tok)
    return model, tok


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    for family in spec["families"]:
        d = Path(out_dir) / family
        name, _, variant = family.partition("/")  # "model/variant": another shipped head
        if name in safeattn.models.MODELS:  # a shipped model and head (not saved again)
            model, tok = safeattn.models.load_default(name, variant=variant or None)
            d.mkdir(parents=True, exist_ok=True)
        elif family.endswith("+ens"):
            model, tok = tiny_ensemble(family[:-len("+ens")], d)
        else:
            model, tok = tiny_safe_model(family)
            model.save_pretrained(d)
            tok.save_pretrained(d)
            safeattn.save_safety(model, d)
        cases = [[_row(model, tok, prompt, case, spec["max_tokens"]) for prompt in spec["prompts"]]
                 for case in spec["cases"]]
        prefill_cases = [[_row(model, tok, conv, case, spec["max_tokens"])
                          for conv in spec.get("prefills", [])]
                         for case in spec.get("prefill_cases", [])]
        stop_cases = [{"case": c, "prompt": i, "stop": stop,
                       **_row(model, tok, spec["prompts"][i], spec["cases"][c],
                              spec["max_tokens"], stop=stop)}
                      for c, i, stop in _stops_mid_alarm(tok, cases, spec["cases"])]
        (d / "ref.json").write_text(json.dumps({"cases": cases, "prefill_cases": prefill_cases,
                                                "stop_cases": stop_cases,
                                                "eos": tok.eos_token_id}))


def _stop_at(tok, word):
    """HF's ``stop_strings`` for one word of the tiny word-level vocabulary (whose tokens its
    ``StopStringCriteria`` cannot read): end a row at the token that spells it, which
    :func:`_stops_mid_alarm` picks where no earlier text holds it."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tid = tok.convert_tokens_to_ids(word)

    class StopAtWord(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == tid

    return StoppingCriteriaList([StopAtWord()])


def _stops_mid_alarm(tok, cases, configs, most=3):
    """``(case, prompt, stop string)``: a stop string that ends a row at a token where its
    alarm is pending (a check hit, not refused): the word of that token, where neither the
    words before it nor their joins hold it (so that HF and vLLM stop at that token)."""
    found = []
    for c, rows in enumerate(cases):
        if configs[c] is None:
            continue
        for i, r in enumerate(rows):
            ids, end, words = r["ids"], r["refusal_step"], []
            for n, t in enumerate(ids[:-1]):
                word = tok.convert_ids_to_tokens(t)
                before = "".join(words)
                if n and r["mode"][n] == "transition" and (end is None or end > n) and \
                        t not in tok.all_special_ids and (before + word).find(word) == len(before):
                    found.append((c, i, word))
                    break
                words.append(word)
            if len(found) == most:
                return found
    return found


def _row(model, tok, prompt, case, max_tokens, stop=None):
    """One prompt (or conversation) under one case (a SafetyConfig, or None: safety off),
    ended by the stop string ``stop`` if given."""
    enc = safeattn.build_inputs(tok, [prompt])
    n = enc["input_ids"].shape[1]
    if case is None:
        # safety off: the [CLS]-prefixed row that no ordinary row sees, i.e. the prompt at
        # RoPE positions 1..P as in the vLLM wrapper
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        return {"ids": out[0, n:].tolist()}
    # the row ends with its assistant turn (turn_end), as safeattn.vllm.requests asks vLLM to
    streamer = PrintedStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = safeattn.generate(model, tok, [prompt], safety=safeattn.SafetyConfig(**case),
                            max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                            **({"stopping_criteria": _stop_at(tok, stop)} if stop else {}))
    s = out.safety[0]
    return {"ids": out[0, n:].tolist(), "p": s.p, "checked": s.checked,
            "streamed": "".join(streamer.text), "mode": s.mode, "refusal_step": s.refusal_step,
            "alarm_step": s.alarm_step, "justification": s.justification,
            "prefill_checks": s.prefill_checks,
            "q_span": [int(enc["q_span"][0, 0]) - 1, int(enc["q_span"][0, 1]) - 1]}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
