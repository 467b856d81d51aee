"""A tensor-parallel safeattn engine for the vLLM tests (runs in vLLM's venv, as a process of
its own: its workers are processes, and a test process's in-process engines keep vLLM's
one-device groups).

``python _vllm_tp.py JOB.json OUT.json``: JOB gives ``model_dir``, ``tp``, ``prompts``,
``cases`` (safety configs), ``prefills`` (conversations ending with an assistant prefill) and
``prefill_cases``, ``max_tokens``. OUT gets, per case, each row's generated ids and its trace
(``safeattn.vllm.trace`` of a ``published`` request: the processors run in the workers), as
the fields of a ``RowSafety``.
``fail_rank`` (optional): the probe attention of that rank raises (:class:`BrokenProbe`); in
every probe pass, or with ``fail_pass: "separate"`` only in the passes of their own
(:meth:`ProbeRunner.run`: the prefill checks, and every check with ``fold_probe: false``), or
with ``fail_pass: "tokens"`` the response probe's token values (``models.token_logits``).
``fold_probe`` (optional): the engine option of that name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run(llm, tok, rows, cases, max_tokens, tag):
    import safeattn.vllm as sv

    out = []
    for c, cfg in enumerate(cases):
        ids = [f"tp-{tag}-{c}-{i}" for i in range(len(rows))]
        ps, sps = sv.requests(tok, rows, safety=cfg, ids=ids if cfg else None,
                              published=cfg is not None, max_tokens=max_tokens,
                              temperature=0.0)
        outs = llm.generate(ps, sps, use_tqdm=False)
        res = []
        for o, i in zip(outs, ids):
            got = list(o.outputs[0].token_ids)
            tr = dataclasses.asdict(sv.trace(i, len(got))[0]) if cfg else None
            res.append({"ids": got, "trace": tr})
        out.append(res)
    return out


class BrokenProbe:
    """``worker_extension_cls`` of a ``fail_rank`` job: vLLM imports this module in each
    worker (spawned), which breaks the probe of rank ``$SAFEATTN_TP_FAIL_RANK`` there."""


def _break_probe(rank: int, where: str) -> None:
    from vllm.distributed import get_tensor_model_parallel_rank

    from safeattn.vllm import models
    from safeattn.vllm.probe import ProbeRunner

    # attend: both passes; _attention: the separate pass only (the folded one calls attend);
    # token_logits: the response probe's w · h of the forward's tokens
    owner, name = {"any": (ProbeRunner, "attend"), "separate": (ProbeRunner, "_attention"),
                   "tokens": (models, "token_logits")}[where]
    original = getattr(owner, name)

    def broken(*args, **kwargs):
        if get_tensor_model_parallel_rank() == rank:
            raise RuntimeError(f"rank {rank}'s probe broke")
        return original(*args, **kwargs)

    setattr(owner, name, broken)


if __name__ != "__main__" and os.environ.get("SAFEATTN_TP_FAIL_RANK"):
    _break_probe(int(os.environ["SAFEATTN_TP_FAIL_RANK"]),
                 os.environ.get("SAFEATTN_TP_FAIL_PASS", "any"))


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    os.environ.setdefault("SAFEATTN_STREAM_DIR", tempfile.mkdtemp(prefix="safeattn-tp-"))
    from transformers import AutoTokenizer
    from vllm import LLM

    import safeattn.vllm as sv

    kw = {}
    if job.get("fail_rank") is not None:
        os.environ["SAFEATTN_TP_FAIL_RANK"] = str(job["fail_rank"])
        os.environ["SAFEATTN_TP_FAIL_PASS"] = job.get("fail_pass", "any")
        kw["worker_extension_cls"] = f"{Path(__file__).stem}.BrokenProbe"
    d = job["model_dir"]
    engine = sv.engine_kwargs(d)
    if "fold_probe" in job:
        engine["hf_overrides"]["safeattn_vllm"]["fold_probe"] = job["fold_probe"]
    llm = LLM(**engine, tensor_parallel_size=job["tp"],
              distributed_executor_backend="mp", dtype="float32", enforce_eager=True,
              max_model_len=256, max_num_seqs=8, seed=0, **kw)
    tok = AutoTokenizer.from_pretrained(d)
    res = {"cases": run(llm, tok, job["prompts"], job["cases"], job["max_tokens"], 1),
           "prefill_cases": run(llm, tok, job["prefills"], job["prefill_cases"],
                                job["max_tokens"], 2)}
    Path(out_path).write_text(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:3])
